"""Can the toy DiT memorise a few clips? An independent plain-PyTorch flow-matching loop (no project trainer).

    python -m toy.memorise_check --data_path <toy recipe workdir>/dataset/clean_data --clips 8 --steps 1500
    python -m toy.memorise_check ... --weighting gaussian     # the reference's Stage-1 loss weight

Trains a fresh ``TOY_DIT`` on the first ``--clips`` latents of a toy latent LMDB (fixed random context per clip,
shift-5 timesteps, AdamW), samples each clip from noise with a 50-step Euler loop, decodes with the toy VAE and scores
the result with the toy detector against the clip's caption. docs/toy_world.md compares it with ``train.py``: it
is how the Gaussian loss weight was found to starve the high-noise layout (1500 steps, 8 clips, this script on
the CPU: 0.91 uniform, 0.66 Gaussian).
"""

import argparse
import logging
import sys

import torch

from model.scheduler import FlowMatchScheduler
from model.vae import WanVAE
from model.wan import WanModel
from toy.eval import score_video
from toy.folders import TOY_DIT
from utils.datasets import LatentLMDBDataset

log = logging.getLogger("toy_memorise_check")


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", required=True, help="toy latent LMDB (clean_latent [9, 16, 8, 8] + prompts)")
    p.add_argument("--vae", default="assets/toy/Toy-T2V/vae", help="toy VAE folder for decoding the samples")
    p.add_argument("--clips", type=int, default=8, help="clips to memorise (the first N rows)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    p.add_argument("--batch_size", type=int, default=8, help="clips per step")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--shift", type=float, default=5.0, help="timestep shift of training and sampling")
    p.add_argument("--weighting", choices=("uniform", "gaussian"), default="uniform", help="loss weight over t")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and noise")
    args = p.parse_args(argv)
    if args.shift <= 0:
        p.error(f"--shift must be > 0, got {args.shift}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(args.seed)
    rows = LatentLMDBDataset(args.data_path)
    x0s = torch.stack([rows[i]["clean_latent"].float() for i in range(args.clips)])   # [N, F, C, h, w]
    captions = [rows[i]["prompts"] for i in range(args.clips)]
    contexts = torch.randn(args.clips, TOY_DIT.text_len, TOY_DIT.text_dim)
    frames = x0s.shape[1]
    weights = FlowMatchScheduler(num_train_timesteps=1000, shift=args.shift)
    model = WanModel(TOY_DIT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    for step in range(args.steps):
        idx = torch.randint(0, args.clips, (args.batch_size,))
        x0, eps = x0s[idx], torch.randn_like(x0s[idx])
        sigma = shifted(torch.rand(args.batch_size), args.shift)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = model((1 - s) * x0 + s * eps, (sigma * 1000).view(-1, 1).expand(-1, frames), contexts[idx])
        w = weights.training_weight(sigma * 1000) if args.weighting == "gaussian" else torch.ones_like(sigma)
        loss = ((pred - (eps - x0)).pow(2).mean((1, 2, 3, 4)) * w).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            log.info("step %d: loss %.4f", step, loss.item())

    model.eval()
    vae = WanVAE.from_pretrained(args.vae)
    sigmas = shifted(torch.linspace(1, 0, 51), args.shift)
    scores = []
    with torch.no_grad():
        x = torch.randn_like(x0s)
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            x = x + (b - a) * model(x, torch.full((args.clips, frames), a.item() * 1000), contexts)
        error = (x - x0s).pow(2).mean((1, 2, 3, 4)) / x0s.var()
        for i in range(args.clips):
            video = ((vae.decode(x[i:i + 1])[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
            scores.append(score_video(video.numpy(), captions[i])["faithfulness"])
    log.info("relative latent error per clip: %s", [round(e, 3) for e in error.tolist()])
    log.info("detector faithfulness of the samples: %.3f %s", sum(scores) / len(scores), scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
