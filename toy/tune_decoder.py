"""Fine-tune the toy VAE's decoder on noised latents (an experiment of issue 27, not part of the recipe).

    python -m toy.tune_decoder --vae assets/toy/Toy-T2V/vae --noise 0.5 --steps 200 --out output/vae_noise05

The encoder and the latent normalisation stay as they are, so every trained DiT still reads and writes the same
latents. Each step decodes the normalised posterior means of four training clips with Gaussian noise of a std drawn
uniformly from [0, --noise] per clip added (in the normalised space the DiTs work in), against the clean clips (L1 +
L2): a decoder that should turn an imperfect generated latent into a clean object. docs/toy_results.md ("Frame 0")
has what it did to the shipped generators.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from model.vae import WanVAE
from toy.vae import decode_unclamped, videos_to_tensor
from toy.world import make_split


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="diffusers VAE folder to start from")
    p.add_argument("--out", required=True, help="folder the tuned VAE is written to (diffusers format, fp16)")
    p.add_argument("--noise", type=float, default=0.5, help="largest latent noise std, in normalised units")
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
        z = torch.cat([vae.encode(pixels[i:i + 16]) for i in range(0, len(pixels), 16)])   # [N, 9, 16, 8, 8]
    params = [*model.decoder.parameters(), *model.post_quant_conv.parameters()]
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    start = time.monotonic()
    for step in range(args.steps):
        idx = torch.randint(len(pixels), (4,), generator=g)
        sigma = torch.rand(4, 1, 1, 1, 1, generator=g) * args.noise
        noised = z[idx] + sigma * torch.randn(z[idx].shape, generator=g)
        recon = decode_unclamped(model, vae.denormalize(noised).permute(0, 2, 1, 3, 4))
        loss = (recon - pixels[idx]).abs().mean() + (recon - pixels[idx]).square().mean()
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
