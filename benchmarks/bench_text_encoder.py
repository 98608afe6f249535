"""Time to encode a new prompt with UMT5-XXL (full size, zero weights: the time does not depend on their values), as
``TextEncoder`` runs it (only the columns up to the prompt's last token) against the same encoder over all
``text_len`` (512) columns, as the published code runs it. One prompt at a time, the prompt-embedding cache off.

The tokenizer is the toy folder's (a small unigram vocabulary: an English prompt takes more tokens than with UMT5's own
250k-piece one, so the token counts here are upper bounds of the real ones); each row records its count.

    python benchmarks/bench_text_encoder.py --device cuda --runs 5 --out $OUT/text_encoder.json
    python benchmarks/bench_text_encoder.py --device cpu --runs 1 --out $OUT/text_encoder_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_inference import zero_text_encoder
from common import save_results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, runs: int) -> list[float]:
    fn()   # warm-up (kernel selection, allocator)
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where UMT5 runs")
    p.add_argument("--runs", type=int, default=5, help="timed encodes per prompt and way (median reported)")
    p.add_argument("--prompts", default=str(Path(__file__).resolve().parent.parent / "prompts/demos.txt"),
                   help="text file, one prompt a line")
    p.add_argument("--num_prompts", type=int, default=3, help="the first N prompts of --prompts")
    p.add_argument("--tiny", action="store_true", help="smoke test: a tiny UMT5 and text_len 16")
    p.add_argument("--out", default="bench_text_encoder.json", help="JSON output path")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    encoder = zero_text_encoder(args.tiny)
    encoder.cache_size = 0
    encoder.encoder.to(device)
    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    rows = []
    with torch.no_grad():
        for prompt in prompts[:args.num_prompts]:
            def all_columns():   # what TextEncoder ran before it trimmed the columns
                ids, mask = (t.to(device) for t in encoder.tokenize([prompt]))
                hidden = encoder.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                return hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)

            mask = encoder.tokenize([prompt])[1]
            used = timed(lambda: encoder.encode([prompt]), device, args.runs)
            full = timed(all_columns, device, args.runs)
            row = dict(prompt=prompt, tokens=int(mask.sum()), text_len=encoder.text_len,
                       used_columns_s=statistics.median(used), all_columns_s=statistics.median(full),
                       used_columns_runs=used, all_columns_runs=full)
            rows.append(row)
            print(f"{row['tokens']:4d} tokens: {row['used_columns_s'] * 1e3:9.1f} ms over its columns, "
                  f"{row['all_columns_s'] * 1e3:9.1f} ms over all {row['text_len']}")
    save_results(args.out, rows, device, dtype=str(encoder.dtype), runs=args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
