"""Time to encode a new prompt with UMT5-XXL (full size, zero weights: the time does not depend on their values), as
``TextEncoder`` runs it (only the columns up to the prompt's last token) against the same encoder over all
``text_len`` (512) columns, as the published code runs it. One prompt at a time, the prompt-embedding cache off.

The tokenizer is the toy folder's (a small unigram vocabulary: an English prompt takes more tokens than with UMT5's own
250k-piece one, so the token counts here are upper bounds of the real ones); each row records its count.
``--int8`` also times the encoder with int8 weights (``text_encoder_int8``).

``--accuracy`` instead measures what int8 weights change (GPU; UMT5-XXL with transformers' random initialisation,
seed 0, as no real weights are at hand): the embeddings of the prompts from the float32 encoder, then from its bf16
copy (what the released bf16 file gives), then from that copy stored in int8; the relative error of each against
float32 over the real tokens, and each linear layer's output error on the inputs it sees.

    python benchmarks/bench_text_encoder.py --device cuda --runs 5 --out $OUT/text_encoder.json
    python benchmarks/bench_text_encoder.py --device cpu --runs 1 --out $OUT/text_encoder_cpu.json
    python benchmarks/bench_text_encoder.py --device cuda --accuracy --num_prompts 8 --out $OUT/int8.json

``--host_memory WEIGHTS`` instead loads a real-format UMT5 (a Wan folder or ``.pth``, or a transformers folder) with
``TextEncoder.from_pretrained`` on the CPU, as ``--text_encoder_cpu`` does, and records the process's resident memory
(anonymous and file-backed: the Wan ``.pth`` is memory-mapped) after loading and after encoding one prompt; with
``--int8``, loaded as ``--text_encoder_int8`` loads it.
``--write_zero_wan FOLDER`` writes a full-size zero-weight Wan ``.pth`` (10.6 GiB) and a link to the toy tokenizer
there, to load in a second process (whose peak memory then counts the loading alone):

    python benchmarks/bench_text_encoder.py --write_zero_wan /tmp/umt5
    python benchmarks/bench_text_encoder.py --host_memory /tmp/umt5 --out $OUT/host.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_inference import benchmark_text_encoder, zero_text_encoder
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


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def accuracy(args, device: torch.device, prompts: list[str]) -> list[dict]:
    """Embedding and per-layer errors of the bf16 and int8 encoders against float32 (module docstring)."""
    from transformers import UMT5EncoderModel

    from model.int8 import Int8Linear
    from model.text_encoder import umt5_config
    from toy.folders import TINY_T5

    torch.manual_seed(0)
    config = umt5_config(**(TINY_T5 if args.tiny else {}))
    with torch.device(device):
        model = UMT5EncoderModel(config).float()   # transformers' random initialisation
    encoder = benchmark_text_encoder(model, args.tiny)
    encoder.cache_size = 0
    mask = encoder.tokenize(prompts)[1].bool()
    real = mask[:, :int(mask.sum(1).max())].to(device)
    seen: dict[str, torch.Tensor] = {}   # each sampled linear layer's input rows of the real tokens, float32 pass

    def record(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0][real].detach().float().cpu()
        return hook

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    blocks = ("encoder.block.0.", f"encoder.block.{config.num_layers - 1}.")
    sample = {n for n in linears if n.startswith(blocks)}   # the first and the last block's layers
    handles = [linears[n].register_forward_hook(record(n)) for n in sample]
    with torch.no_grad():
        out = {"float32": encoder.encode(prompts)}
        for h in handles:
            h.remove()
        weights32 = {n: linears[n].weight.detach().clone() for n in sample}
        model.to(torch.bfloat16)
        out["bfloat16"] = encoder.encode(prompts)
        bf16_weights = {n: linears[n].weight for n in sample}
        encoder.to_int8()
        out["int8"] = encoder.encode(prompts)
        modules = dict(model.named_modules())
        layers = []
        for n in sorted(sample):
            x = seen[n].to(device)
            ref = x.double() @ weights32[n].double().T
            x16 = x.to(torch.bfloat16)
            q = modules[n]
            assert isinstance(q, Int8Linear)
            layers.append(dict(layer=n, bf16=relative(torch.nn.functional.linear(x16, bf16_weights[n]), ref),
                               int8=relative(q(x16), ref)))
    full = mask.to(device)
    row = dict(prompts=len(prompts), tokens=int(mask.sum()),
               embedding_error_bf16=relative(out["bfloat16"][full], out["float32"][full]),
               embedding_error_int8=relative(out["int8"][full], out["float32"][full]),
               int8_vs_bf16=relative(out["int8"][full], out["bfloat16"][full]),
               encoder_gib_int8=sum(p.nbytes for p in model.parameters()) / 2**30,
               padding_zero=bool((out["int8"][~full] == 0).all()), layers=layers)
    print(f"embeddings against float32 over {row['tokens']} tokens: bf16 {row['embedding_error_bf16']:.2e}, "
          f"int8 {row['embedding_error_int8']:.2e} (int8 against bf16 {row['int8_vs_bf16']:.2e}); int8 encoder "
          f"{row['encoder_gib_int8']:.2f} GiB")
    for layer in layers:
        print(f"  {layer['layer']:45s} bf16 {layer['bf16']:.2e} int8 {layer['int8']:.2e}")
    return [row]


def resident_gib() -> dict:
    """This process's resident memory now (``/proc/self/status``: total, anonymous, file-backed) and its peak, GiB."""
    fields = {"VmRSS": "rss", "RssAnon": "anonymous", "RssFile": "file_backed", "VmHWM": "peak"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key] + "_gib"] = int(value.split()[0]) / 2**20   # kB
    return out


def write_zero_wan(folder: Path) -> None:
    """``--write_zero_wan`` (module docstring)."""
    from model.weights import WAN_T5_FILENAME, WAN_TOKENIZER_SUBDIR
    from toy.folders import convert_hf_t5_to_wan

    tokenizer = folder / WAN_TOKENIZER_SUBDIR
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    if not tokenizer.exists():   # the toy tokenizer, as for the timings
        tokenizer.symlink_to(Path(__file__).resolve().parent.parent / "assets/toy/Toy-T2V/google/umt5-xxl")
    torch.save(convert_hf_t5_to_wan(zero_text_encoder(False).encoder.state_dict()), folder / WAN_T5_FILENAME)
    print(f"wrote {folder / WAN_T5_FILENAME}")


def host_memory(args, prompts: list[str]) -> list[dict]:
    """``--host_memory`` (module docstring)."""
    from model.text_encoder import TextEncoder

    rows = [dict(stage="start", **resident_gib())]
    t = time.perf_counter()
    encoder = TextEncoder.from_pretrained(args.host_memory, device="cpu", cache_size=0, int8=args.int8)
    rows.append(dict(stage="loaded", seconds=time.perf_counter() - t, **resident_gib()))
    with torch.no_grad():
        t = time.perf_counter()
        encoder.encode(prompts[:1])
    rows.append(dict(stage="encoded one prompt", seconds=time.perf_counter() - t, **resident_gib()))
    for row in rows:
        print(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where UMT5 runs")
    p.add_argument("--runs", type=int, default=5, help="timed encodes per prompt and way (median reported)")
    p.add_argument("--prompts", default=str(Path(__file__).resolve().parent.parent / "prompts/demos.txt"),
                   help="text file, one prompt a line")
    p.add_argument("--num_prompts", type=int, default=3, help="the first N prompts of --prompts")
    p.add_argument("--tiny", action="store_true", help="smoke test: a tiny UMT5 and text_len 16")
    p.add_argument("--int8", action="store_true", help="also time the encoder with int8 weights (with "
                   "--host_memory: load it with int8 weights)")
    p.add_argument("--accuracy", action="store_true", help="measure int8's and bf16's errors against float32 "
                                                            "(random weights; module docstring) instead of speed")
    p.add_argument("--host_memory", default=None, metavar="WEIGHTS", help="record the host memory of loading this "
                   "UMT5 on the CPU and encoding a prompt instead (module docstring)")
    p.add_argument("--write_zero_wan", default=None, metavar="FOLDER", help="write a full-size zero-weight Wan .pth "
                   "(10.6 GiB) and a link to the toy tokenizer into FOLDER, for --host_memory, and exit")
    p.add_argument("--out", default="bench_text_encoder.json", help="JSON output path")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if args.write_zero_wan:
        write_zero_wan(Path(args.write_zero_wan))
        return 0
    if args.host_memory:
        save_results(args.out, host_memory(args, prompts), torch.device("cpu"), int8=args.int8)
        return 0
    if args.accuracy:
        save_results(args.out, accuracy(args, device, prompts[:args.num_prompts]), device)
        return 0
    encoder = zero_text_encoder(args.tiny)
    encoder.cache_size = 0
    encoder.encoder.to(device)
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
        if args.int8:   # the same encoder converted in place: one copy of the weights in memory at a time
            encoder.to_int8()
            for prompt, row in zip(prompts, rows):
                row["int8_runs"] = timed(lambda: encoder.encode([prompt]), device, args.runs)
                row["int8_s"] = statistics.median(row["int8_runs"])
                print(f"{row['tokens']:4d} tokens: {row['int8_s'] * 1e3:9.1f} ms over its columns with int8 weights")
    save_results(args.out, rows, device, dtype=str(encoder.dtype), runs=args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
