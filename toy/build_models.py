r"""Build the toy world's Wan model folder (issue 9): ``<out>/Toy-T2V/`` in the real Wan2.1 layout.

    python -m toy.build_models --out assets/toy                     # 9-frame windows (~7 min on a GPU)
    python -m toy.build_models --out build/toy_ft --vae_init assets/toy/Toy-T2V/vae \
        --vae_frames 33 --vae_batch_size 4 --vae_steps 1000 --vae_lr 2e-4  # then whole clips (~4 min)

The shipped folder was built with these two commands (the second folder replaced the first): trained on 9-frame
windows only, the VAE drifts to other colours after the third latent frame of a 33-frame clip; the whole-clip
fine-tuning removes that (docs/toy_world.md).

Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` (a freshly initialised TOY_DIT, bf16),
``models_t5_umt5-xxl-enc-bf16.pth`` (a random frozen toy UMT5, bf16) + ``google/umt5-xxl/`` (a sentencepiece
tokenizer with one piece per toy word) and ``vae/`` (diffusers format, fp16): the toy VAE TRAINED here on synthetic
clips, with its latent normalisation measured on encoded training clips. ``build_info.json`` records the settings,
training time, reconstruction PSNR on held-out clips and file sizes. The folder is written next to the target and
moved into place at the end, so an interrupted build never leaves a half-written model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally

import torch

from model.vae import WanVAE
from toy.folders import TOY_DIT, TOY_T5, TOY_VAE, toy_words, write_tiny_wan_folder
from toy.vae import (
    ClipPool,
    ToyVAETraining,
    fit_latent_stats,
    init_posterior_logvar,
    reconstruction_psnr,
    train_toy_vae,
)
from toy.world import all_combinations, format_caption, make_split

log = logging.getLogger("build_toy_models")
FOLDER_NAME = "Toy-T2V"


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ToyVAETraining()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="assets/toy", help=f"output root; the model folder is <out>/{FOLDER_NAME}")
    p.add_argument("--vae_steps", type=int, default=defaults.steps, help="VAE optimiser steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, every initialisation and the training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device for VAE training and evaluation, cuda when available (the default 4000 "
                        "full-frame steps take ~7 min on an H100 and hours on a 2-core CPU)")
    p.add_argument("--vae_batch_size", type=int, default=defaults.batch_size, help="training windows per VAE step")
    p.add_argument("--vae_frames", type=int, default=defaults.num_frames,
                   help="frames per training window (1 + 4k); the VAE is causal, so it still encodes 33-frame clips")
    p.add_argument("--vae_crop", type=int, default=defaults.crop,
                   help="spatial crop of the training windows (multiple of 8; 0 = full 64x64 frames)")
    p.add_argument("--vae_full_fraction", type=float, default=defaults.full_size_fraction,
                   help="fraction of the steps (at the end) trained on full frames instead of crops")
    p.add_argument("--vae_lr", type=float, default=defaults.lr, help="peak AdamW learning rate of the VAE")
    p.add_argument("--vae_kl_weight", type=float, default=defaults.kl_weight, help="weight of the KL term")
    p.add_argument("--vae_first_frame_code", type=float, default=defaults.first_frame_code_weight,
                   help="weight of the loss that gives latent frame 0 the code a later latent gives the same frame "
                        "held still (toy.vae.vae_loss); 0 = Wan's objective")
    p.add_argument("--vae_first_frame_weight", type=float, default=defaults.first_frame_weight,
                   help="weight of each training window's pixel frame 0 in the reconstruction loss")
    p.add_argument("--vae_init", default=None,
                   help="continue training from this diffusers VAE folder (e.g. a previous <out>/Toy-T2V/vae) "
                        "instead of a fresh initialisation")
    p.add_argument("--vae_save_every", type=int, default=250,
                   help=f"write the VAE training state to <out>/{FOLDER_NAME}.vae_training_state.pt every N steps; "
                        "a rerun with the same settings resumes from it")
    p.add_argument("--train_clips", type=int, default=1024, help="synthetic training clips (33 frames, 64x64)")
    p.add_argument("--stats_clips", type=int, default=48,
                   help="training clips encoded to measure the latent mean/std per channel")
    p.add_argument("--heldout_clips", type=int, default=16,
                   help="held-out clips (unseen caption combinations) for the reconstruction PSNR")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); on a CPU shared with other jobs 1 is much faster, "
                        "since waiting intra-op threads spin")
    p.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bar")
    return p.parse_args(argv)


def train_vae(args: argparse.Namespace, train_videos: list, heldout_videos: list,
              heldout_captions: list[str]) -> tuple:
    """Train, normalise and evaluate the toy VAE; returns ``(AutoencoderKLWan, info dict)``."""
    from diffusers import AutoencoderKLWan

    cfg = ToyVAETraining(steps=args.vae_steps, batch_size=args.vae_batch_size, num_frames=args.vae_frames,
                         crop=args.vae_crop, full_size_fraction=args.vae_full_fraction, lr=args.vae_lr,
                         kl_weight=args.vae_kl_weight, first_frame_code_weight=args.vae_first_frame_code,
                         first_frame_weight=args.vae_first_frame_weight,
                         seed=args.seed)
    torch.manual_seed(args.seed)
    model = AutoencoderKLWan(**TOY_VAE)
    if args.vae_init:
        model.load_state_dict(WanVAE.from_pretrained(args.vae_init).model.state_dict())
        log.info("toy VAE initialised from %s", args.vae_init)
    else:
        init_posterior_logvar(model)
    log.info("toy VAE: %.2fM parameters; training %d steps on %d clips (%s)",
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.steps, len(train_videos), cfg)
    start = time.monotonic()
    state_path = Path(args.out) / (FOLDER_NAME + ".vae_training_state.pt")
    state_path.parent.mkdir(parents=True, exist_ok=True)
    losses = train_toy_vae(model, ClipPool(train_videos, seed=args.seed), cfg, args.device,
                           progress=not args.no_progress, state_path=state_path, save_every=args.vae_save_every)
    state_path.unlink(missing_ok=True)   # finished: the folder written next replaces it
    train_seconds = time.monotonic() - start
    mean, std = fit_latent_stats(model, train_videos[:args.stats_clips], device=args.device)
    log.info("latent normalisation from %d training clips: mean %s std %s", len(train_videos[:args.stats_clips]),
             [round(v, 3) for v in mean], [round(v, 3) for v in std])
    psnr32, latent_shape = reconstruction_psnr(WanVAE(model), heldout_videos)
    shipped = WanVAE(AutoencoderKLWan.from_config(model.config))  # what the fp16 file will load as
    shipped.model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    psnr16, _ = reconstruction_psnr(shipped.to(args.device), heldout_videos)
    log.info("VAE trained in %.0f s; held-out PSNR %.2f dB (fp32), %.2f dB (fp16 as shipped); latents %s",
             train_seconds, psnr32, psnr16, list(latent_shape))
    faithful, tail_psnr = reconstruction_checks(shipped, heldout_captions, heldout_videos)
    log.info("held-out reconstructions: toy-detector faithfulness %.3f (the clips themselves: 1.0), PSNR of the last "
             "%d frames %.2f dB (drift over time shows here)", faithful, TAIL_FRAMES, tail_psnr)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    info = dict(heldout_faithfulness=round(faithful, 3), heldout_tail_psnr_db=round(tail_psnr, 2),
                initialised_from=_init_info(args.vae_init), train_seconds=round(train_seconds, 1), steps=cfg.steps,
                final_loss=round(final_loss, 5),
                heldout_psnr_db_fp32=round(psnr32, 2), heldout_psnr_db_fp16=round(psnr16, 2),
                heldout_clips=len(heldout_videos), latent_shape=list(latent_shape), latents_mean=mean,
                latents_std=std, training=vars(cfg))
    return model.cpu(), info


TAIL_FRAMES = 8


@torch.no_grad()
def reconstruction_checks(vae: WanVAE, captions: list[str], videos: list) -> tuple[float, float]:
    """Mean toy-detector faithfulness of the reconstructed clips against their captions, and the mean PSNR of their
    last ``TAIL_FRAMES`` frames (a VAE trained on short windows can drift late in a long clip)."""
    from toy.eval import score_video
    from toy.vae import psnr, videos_to_tensor

    scores, tails = [], []
    for caption, video in zip(captions, videos):
        pixels = videos_to_tensor(video[None]).to(vae.device)               # [1, 3, T, H, W]
        recon = vae.decode(vae.encode(pixels))[0].clamp(-1, 1)               # [T, 3, H, W]
        tails.append(psnr(pixels[0, :, -TAIL_FRAMES:].transpose(0, 1), recon[-TAIL_FRAMES:]))
        frames = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores.append(score_video(frames, caption)["faithfulness"])
    return sum(scores) / len(scores), sum(tails) / len(tails)


def _init_info(vae_init: str | None):
    """Provenance of a fine-tuned VAE: the build_info.json of the folder it started from."""
    if not vae_init:
        return None
    info = Path(vae_init).parent / "build_info.json"
    return json.loads(info.read_text()).get("vae") if info.is_file() else str(vae_init)


def folder_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True   # fixed window shapes: let cuDNN pick its fastest 3D convolutions
    target = Path(args.out) / FOLDER_NAME
    start = time.monotonic()
    train, heldout = make_split(args.train_clips, args.heldout_clips, seed=args.seed, num_frames=33, height=64,
                                width=64)
    log.info("synthetic data: %d training / %d held-out clips of 33x64x64", len(train), len(heldout))
    vae_model, vae_info = train_vae(args, [v for _, v in train], [v for _, v in heldout],
                                    [c for c, _ in heldout])

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    captions = [format_caption(c) for c in all_combinations()]
    write_tiny_wan_folder(staging, dit=TOY_DIT, t5=TOY_T5, sentences=captions, seed=args.seed, words=toy_words(),
                          vae_model=vae_model, weights_dtype=torch.bfloat16, vae_dtype=torch.float16)
    sizes = folder_sizes(staging)
    info = dict(args=vars(args), dit=TOY_DIT.to_dict(), t5=TOY_T5, vae=vae_info, total_bytes=sum(sizes.values()),
                files=sizes, build_seconds=round(time.monotonic() - start, 1))
    (staging / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    for name, size in sizes.items():
        log.info("wrote %s (%.1f kB)", target / name, size / 1e3)
    log.info("total %.2f MB in %s; VAE held-out PSNR %.2f dB; built in %.0f s", info["total_bytes"] / 1e6, target,
             vae_info["heldout_psnr_db_fp16"], info["build_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
