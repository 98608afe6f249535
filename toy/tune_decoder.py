"""Fine-tune the toy VAE's decoder on imperfect latents (an experiment of issue 27, not part of the recipe).

    python -m toy.tune_decoder --source base_x0 --steps 200 --out output/vae_base_x0

The encoder and the latent normalisation stay as they are, so every trained DiT still reads and writes the same
latents. Each step decodes four training clips' latents, made imperfect as ``--source`` says, against the clean
clips (L1 + L2, pixel frame 0 weighted ``--frame0_weight`` against the others' 1):

* ``base_x0``: the shipped base's one-step x0 prediction from the clip noised to a timestep drawn uniformly from
  ``[--t_min, --t_max]`` (the errors the DiT makes, which lose frame 0's object more often than Gaussian noise of the
  same size: docs/toy_results.md, "Frame 0"); a quarter of the clips clean;
* ``noise``: Gaussian noise of a std drawn uniformly from ``[0, --noise]`` per clip, in the normalised space.

docs/toy_results.md ("Frame 0") has what it did.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from model.vae import WanVAE
from toy.vae import decode_unclamped, videos_to_tensor
from toy.world import make_split

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def base_predictions(z: torch.Tensor, captions: list[str], t_min: float, t_max: float, seed: int) -> torch.Tensor:
    """The shipped base's x0 prediction of each latent clip ``z`` [N, F, C, h, w] from one noising each."""
    from pipeline import components
    from utils.config import load_config

    cfg = load_config(REPO / "configs" / "toy" / "base.yaml", [f"wan_models_dir={REPO / 'assets' / 'toy'}"])
    model = components.build_bidirectional(cfg, cfg.generator_name, device="cpu").eval()
    encoder = components.build_text_encoder(cfg, device="cpu", dtype=torch.float32)
    scheduler = components.build_scheduler(cfg)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(z), 16):
        x0 = z[i:i + 16]
        t = t_min + (t_max - t_min) * torch.rand(len(x0), generator=g)
        tt = t[:, None].expand(x0.shape[:2])
        x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), tt)
        out.append(scheduler.flow_to_x0(model(x_t, tt, encoder.encode(captions[i:i + 16])), x_t, tt))
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(REPO / "assets" / "toy" / "Toy-T2V" / "vae"), help="VAE folder to start from")
    p.add_argument("--out", required=True, help="folder the tuned VAE is written to (diffusers format, fp16)")
    p.add_argument("--source", choices=("base_x0", "noise"), default="base_x0", help="what makes the latents imperfect")
    p.add_argument("--t_min", type=float, default=200.0, help="base_x0: smallest noising timestep")
    p.add_argument("--t_max", type=float, default=800.0, help="base_x0: largest noising timestep")
    p.add_argument("--noise", type=float, default=0.5, help="noise: largest latent noise std, in normalised units")
    p.add_argument("--frame0_weight", type=float, default=1.0,
                   help="weight of pixel frame 0 in the loss, the other frames 1 (1: the plain mean)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (batch 4 whole clips)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--clips", type=int, default=256, help="training clips (toy.world.make_split, seed 0)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = WanVAE.from_pretrained(args.vae)
    model = vae.model.float()
    train, _ = make_split(args.clips, 0, seed=0, num_frames=33, height=64, width=64)
    pixels = videos_to_tensor([v for _, v in train])                  # [N, 3, 33, 64, 64]
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[i:i + 16]) for i in range(0, len(pixels), 16)]).float()  # [N, 9, 16, 8, 8]
    start = time.monotonic()
    if args.source == "base_x0":
        predicted = base_predictions(z, [c for c, _ in train], args.t_min, args.t_max, seed=1)
        print(f"base predictions of {len(z)} clips: {time.monotonic() - start:.0f} s", flush=True)
    params = [*model.decoder.parameters(), *model.post_quant_conv.parameters()]
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    frame_weights = torch.ones(pixels.shape[2])
    frame_weights[0] = args.frame0_weight
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        idx = torch.randint(len(pixels), (4,), generator=g)
        if args.source == "base_x0":
            clean = torch.rand(4, generator=g) < 0.25
            latents = torch.where(clean[:, None, None, None, None], z[idx], predicted[idx])
        else:
            sigma = torch.rand(4, 1, 1, 1, 1, generator=g) * args.noise
            latents = z[idx] + sigma * torch.randn(z[idx].shape, generator=g)
        recon = decode_unclamped(model, vae.denormalize(latents).permute(0, 2, 1, 3, 4))
        diff = recon - pixels[idx]                                     # [4, 3, T, H, W]
        loss = ((diff.abs() + diff.square()).mean((0, 1, 3, 4)) * frame_weights).sum() / frame_weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}, {time.monotonic() - start:.0f} s", flush=True)
    model.eval().to(torch.float16).save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
