"""Where the time of one toy base training step goes: its draws, its text encoding, its forward and backward.

The toy base (``configs/toy/bidirectional_base.yaml``: the config's batch of clips at its latent shape, the clip's
loss and the one-frame image loss of latent frame 0) is the longest stage of ``python -m toy.recipe``. The DiT is the
shipped one (``assets/toy/Toy-T2V``); the clips are random latents (speed does not depend on values). Each part is
timed on its own as wall time between synchronisations (a toy step is bound by the host as much as by the GPU):

- ``draw_video`` / ``draw_image``: the per-sample noise and timesteps of the clip and of its frame 0, drawn in the
  training process (the loop's DataLoader workers make them beside the samples: ``trainer/diffusion.py: SampleDraws``);
- ``encode``: caption dropout and the text encoder, on captions of the toy world's attribute combinations in random
  order, as training sees them (through the config's prompt cache, ``text_encoder_cache_size``);
- ``step``: the whole step as the training process runs it (``objective.loss`` on a batch that brings its draws,
  backward, fused AdamW; the loop's gradient clipping left out);
- ``video_fwd_bwd_<fp32|bf16>[_compiled]``: the clip's forward, loss and backward and the optimizer step alone
  (bf16: ``torch.autocast``; compiled: every transformer block ``torch.compile``d, as the config key ``compile``).

    python benchmarks/bench_toy_base_step.py --device cuda --compile --out toy_base_step.json
    python benchmarks/bench_toy_base_step.py --device cpu --batch 2 --iters 1    # smoke test
    python benchmarks/bench_toy_base_step.py --device cpu --parts encode --override text_encoder_cache_size=8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import save_results
from torch.utils.data import default_collate

from toy import world
from trainer.diffusion import IMAGE_STREAM
from trainer.registry import build_objective
from utils.config import load_config
from utils.distributed import transformer_blocks

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "toy" / "bidirectional_base.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default: the config's batch_size)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per part, after 3 warm-up calls")
    p.add_argument("--compile", action="store_true", help="also time the forward and backward with compiled blocks")
    p.add_argument("--parts", nargs="+", default=None, metavar="PART",
                   help="time only these parts (default: all; names as in the JSON, e.g. encode step)")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides of the base's config, e.g. text_encoder_cache_size=8")
    p.add_argument("--out", default="bench_toy_base_step.json", help="JSON results file")
    return p.parse_args(argv)


def wall_ms(fn, device: torch.device, iters: int) -> float:
    """Mean wall time of ``iters`` calls of ``fn`` after 3 warm-up calls, in ms, synchronised before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True    # the training loop's setting on a GPU
    torch.backends.cudnn.allow_tf32 = True
    cfg = load_config(CONFIG, [f"wan_models_dir={REPO / 'assets' / 'toy'}", *args.override])
    objective = build_objective(cfg)
    networks = objective.build_networks(device)
    objective.attach(networks)
    generator = networks.trainable["generator"]
    optimizer = torch.optim.AdamW(generator.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    batch_size = args.batch or cfg.batch_size
    torch.manual_seed(0)
    x0 = torch.randn(batch_size, *cfg.image_or_video_shape[1:])
    if device.type == "cuda":
        x0 = x0.pin_memory()   # as the loop's DataLoader hands batches over
    captions = [world.format_caption(attrs) for attrs in world.all_combinations()]
    prompts = [captions[i] for i in torch.randint(len(captions), (batch_size,)).tolist()]
    ids = torch.arange(batch_size) + 1000
    # as the loop's batches bring them: each sample's draws, made by a DataLoader worker (here once, up front)
    made = default_collate([objective.draws({"clean_latent": x}, int(i)) for x, i in zip(x0, ids)])["draws"]
    batch = {"clean_latent": x0, "prompts": prompts, "sample_id": ids, "draws": made}
    on_device = x0.to(device)
    context = objective.encode_prompts(prompts)
    draw = objective.draw(on_device, ids)

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        update(objective.loss("generator", batch, step=0)[0])

    def video(dtype: torch.dtype | None):
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
                loss, _ = objective.denoising_loss(generator, on_device, context, draw)
            update(loss)
        return run

    parts = {
        "draw_video": lambda: objective.draw(on_device, ids),
        "draw_image": lambda: objective.draw(on_device[:, :1], ids, IMAGE_STREAM),
        "encode": lambda: objective.encode_prompts(objective.drop_captions(prompts, ids)),
        "step": step,
        "video_fwd_bwd_fp32": video(None),
        "video_fwd_bwd_bf16": video(torch.bfloat16),
    }
    compiled = {"video_fwd_bwd_fp32_compiled": video(None), "video_fwd_bwd_bf16_compiled": video(torch.bfloat16),
                "step_compiled": step} if args.compile else {}
    wanted = set(args.parts or [*parts, *compiled])
    if unknown := wanted - {*parts, *compiled}:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {[*parts, *compiled]}")
    rows = [dict(part=name, ms=round(wall_ms(fn, device, args.iters), 2)) for name, fn in parts.items()
            if name in wanted]
    if wanted & set(compiled):
        for block in transformer_blocks(generator):
            block.compile()
        rows += [dict(part=name, ms=round(wall_ms(fn, device, args.iters), 2)) for name, fn in compiled.items()
                 if name in wanted]
    for row in rows:
        print(f"{row['part']:>30}: {row['ms']:8.2f} ms")
    return save_results(args.out, rows, device, batch_size=batch_size, config=str(CONFIG.relative_to(REPO)),
                        overrides=args.override)


if __name__ == "__main__":
    main()
