r"""Causal ODE trajectories of a Stage-1 model: the training data of Stage-2a ODE regression (training.md §4).

    torchrun --nproc_per_node=8 get_causal_ode_data.py --generator_ckpt checkpoints/framewise/ar_diffusion.pt \
        --rawdata_path dataset/clean_data --output_folder dataset/ODE6KCausal_framewise_latents
    # chunk-wise: the same script with the chunk-wise config (or --num_frame_per_block 3)
    torchrun --nproc_per_node=8 get_causal_ode_data.py --config_path configs/ar_diffusion_tf_chunkwise.yaml \
        --generator_ckpt checkpoints/chunkwise/ar_diffusion.pt --rawdata_path dataset/clean_data \
        --output_folder dataset/ODE6KCausal_chunkwise_latents

The published scripts' names run this one implementation: ``get_causal_ode_data_framewise.py`` and
``get_causal_ode_data_chunkwise.py`` set the Stage-1 config of their block size; ``get_causal_ode_data_kv.py`` (the
name the published README uses) and ``get_causal_ode_data_kv_optimized.py`` take ``--num_frames_per_chunk`` and
``--generation_mode`` as the published KV script does.

Per sample: fresh noise (seeded by the sample index, so a redone sample is identical), then ``--num_steps`` Euler steps
of the guided flow (``uncond + g·(cond − uncond)``) with the ground-truth latent as clean context (teacher forcing),
block by block through the KV cache (:class:`pipeline.causal.BlockLoop`). Kept: the states at the steps whose
timesteps are the student's warped few-step list, the ODE output and the ground truth -> ``[1, S + 2, F, C, H, W]``,
saved as ``{prompt: tensor}`` in ``<output_folder>/<index:05d>.pt`` (read by ``utils/create_lmdb_iterative.py``).
Files appear atomically; a restarted run skips finished files and redoes truncated ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import zipfile
from contextlib import nullcontext

import torch

from model.kv_cache import KVCache
from model.scheduler import FlowMatchScheduler
from model.wan import WanModel
from pipeline.causal import BlockLoop, Guidance, StepSchedule
from utils.errors import ConfigError, UserError
from utils.io import AtomicPath, remove_stale_temps

log = logging.getLogger("get_causal_ode_data")

DEFAULT_STUDENT_STEPS = [1000, 750, 500, 250]   # the Stage-2 configs' denoising_step_list
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator_ckpt", required=True, help="Stage-1 checkpoint (same block size as the config)")
    p.add_argument("--rawdata_path", required=True, help="LMDB of ground-truth latents + prompts (dataset/clean_data)")
    p.add_argument("--output_folder", required=True, help="folder receiving one <index:05d>.pt per sample")
    p.add_argument("--config_path", default="configs/ar_diffusion_tf_framewise.yaml",
                   help="Stage-1 config: model folders, block size, frame count (default: %(default)s)")
    p.add_argument("--num_frame_per_block", "--num_frames_per_chunk", type=int, default=None,
                   help="override the config's num_frame_per_block (1 frame-wise, 3 chunk-wise)")
    p.add_argument("--generation_mode", choices=("full", "blockwise_kv"), default="blockwise_kv",
                   help="accepted for the published KV script's command lines: its 'full' (all frames per step, "
                        "teacher forcing) and 'blockwise_kv' modes compute the same trajectory, which this script "
                        "always computes block by block through the KV cache")
    p.add_argument("--local_rank", type=int, default=None,
                   help="ignored (old launchers pass it); the rank comes from torchrun's environment")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config values applied after the YAML, e.g. --override wan_models_dir=/data/wan_models")
    p.add_argument("--guidance_scale", type=float, default=6.0, help="CFG scale of the teacher (default: %(default)s)")
    p.add_argument("--num_steps", type=int, default=48, help="Euler steps of the ODE (default: %(default)s)")
    p.add_argument("--shift", type=float, default=5.0, help="timestep shift of the Euler grid (default: %(default)s)")
    p.add_argument("--denoising_step_list", type=int, nargs="+", default=None,
                   help="nominal few-step list of the student whose states are kept (warped onto the 1000-step grid);"
                        " default: the config's, else 1000 750 500 250")
    p.add_argument("--use_ema", action="store_true", help="load the checkpoint's generator_ema weights")
    p.add_argument("--max_samples", type=int, default=None, help="process only the first N samples of the dataset")
    p.add_argument("--seed", type=int, default=0, help="noise seed; sample i draws from (seed, i) (default: 0)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="samples integrated together (one batch through the KV cache; each keeps its own noise and "
                        "file). Small models leave a GPU idle at batch 1 (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and compute dtype; bf16 keeps the Euler state in fp32 (default: %(default)s)")
    return p


def record_indices(grid: list[float], wanted: list[float], tol: float = 1e-2) -> list[int]:
    """Positions in the Euler ``grid`` of the ``wanted`` timesteps; ConfigError if one is not on the grid."""
    out = []
    for t in wanted:
        j = min(range(len(grid)), key=lambda i: abs(grid[i] - t))
        if abs(grid[j] - t) > tol:
            raise ConfigError(f"student timestep {t:.3f} is not on the {len(grid)}-step Euler grid (nearest "
                              f"{grid[j]:.3f}); choose --num_steps / --shift so that it is")
        out.append(j)
    return out


def rank_indices(num_samples: int, rank: int, world_size: int) -> range:
    """Sample indices of ``rank``: r, r + W, r + 2W, ... (the reference's split)."""
    return range(rank, num_samples, world_size)


def is_finished(path: str) -> bool:
    """A complete torch file: torch.save writes a zip whose directory sits at the end, so a file cut short by a
    killed writer fails this check (and reading the directory costs a few KB, not the whole file)."""
    return os.path.isfile(path) and zipfile.is_zipfile(path)


@torch.no_grad()
def ode_trajectory(model: WanModel, scheduler: FlowMatchScheduler, timesteps: list[float], keep: list[int],
                   guidance: Guidance, clean: torch.Tensor, noise: torch.Tensor,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Teacher-forced guided Euler trajectory of one batch.

    Args:
        timesteps: the descending Euler grid (no trailing 0; the last step goes to 0).
        keep: step indices whose pre-step states are kept.
        clean: ground truth ``[B, F, C, H, W]``, the context of every block; noise: same shape, float32.
        compute_dtype: autocast dtype for the network (bf16); the Euler state stays in noise's dtype.
    Returns:
        ``[B, len(keep) + 2, F, C, H, W]`` float32: kept states, ODE output, ground truth.
    """
    b, f, _, h, w = noise.shape
    cache = KVCache.for_model(model, b * (2 if guidance.batched else 1), h, w, capacity_frames=f)
    loop = BlockLoop(model, scheduler, StepSchedule(timesteps, rule="euler"), guidance, cache)
    states: dict[int, list[torch.Tensor]] = {j: [] for j in keep}

    def record(frame: int, j: int, x: torch.Tensor) -> None:
        if j in states:
            states[j].append(x.float())

    amp = torch.autocast(noise.device.type, dtype=compute_dtype) if compute_dtype is not None else nullcontext()
    with amp:
        out = [x0.float() for _, x0 in loop.run(noise, context_latents=clean, commit_last=False, record=record)]
    slots = [torch.cat(states[j], 1) for j in keep] + [torch.cat(out, 1), clean.float()]
    return torch.stack(slots, 1)


def _world() -> tuple[int, int, int]:
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _build(args, device: torch.device):
    """Config, generator, text encoder, dataset, Euler grid and kept step indices."""
    from pipeline import components
    from utils.config import load_config
    from utils.datasets import LatentLMDBDataset

    overrides = list(args.override)
    if args.num_frame_per_block is not None:
        overrides.append(f"num_frame_per_block={args.num_frame_per_block}")
    cfg = load_config(args.config_path, overrides)
    dtype = DTYPES[args.dtype]
    # The teacher-forcing trajectory attends to the whole ground-truth prefix: no local window.
    model = components.build_generator(cfg, args.generator_ckpt, args.use_ema, device=device, dtype=dtype,
                                       local_attn_size=-1, sink_size=0).eval().requires_grad_(False)
    text_encoder = components.build_text_encoder(cfg, device=device, dtype=dtype)
    scheduler = components.build_scheduler(cfg)
    grid = scheduler.inference_timesteps(args.num_steps, args.shift).tolist()
    nominal = args.denoising_step_list or cfg.denoising_step_list or DEFAULT_STUDENT_STEPS
    keep = record_indices(grid, scheduler.warp_steps([s for s in nominal if s != 0]).tolist())
    return cfg, model, text_encoder, scheduler, grid, keep, LatentLMDBDataset(args.rawdata_path)


MAX_SEED = 2**31   # sample i draws from manual_seed((seed << 32) + i), which must stay below 2**63


def check_args(args) -> None:
    """Flag values that cannot work, as one-line errors before anything is built."""
    if args.num_steps < 1:
        raise UserError(f"--num_steps must be >= 1, got {args.num_steps}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.shift <= 0:
        raise UserError(f"--shift must be > 0, got {args.shift}")
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max_samples must be >= 1 (leave it out for all samples), got {args.max_samples}")
    if not 0 <= args.seed < MAX_SEED:
        raise UserError(f"--seed must be in [0, 2^31), got {args.seed}")
    if os.path.exists(args.output_folder) and not os.path.isdir(args.output_folder):
        raise UserError(f"--output_folder {args.output_folder} is a file, not a folder")


def generate(args) -> dict[str, int]:
    """Write this rank's trajectories; returns counts ``computed``, ``skipped``, ``redone``."""
    from tqdm import tqdm

    rank, world_size, local_rank = _world()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True    # as the reference: fp32 storage, TF32 matmuls (~8x faster)
        torch.backends.cudnn.allow_tf32 = True
    cfg, model, text_encoder, scheduler, grid, keep, dataset = _build(args, device)
    os.makedirs(args.output_folder, exist_ok=True)
    num_samples = len(dataset) if args.max_samples is None else min(args.max_samples, len(dataset))
    num_frames = cfg.image_or_video_shape[1]
    negative = text_encoder.encode([cfg.negative_prompt]).float()
    counts = {"computed": 0, "skipped": 0, "redone": 0}
    todo = []
    for i in rank_indices(num_samples, rank, world_size):
        path = os.path.join(args.output_folder, f"{i:05d}.pt")
        if is_finished(path):
            counts["skipped"] += 1
        else:
            counts["redone"] += os.path.exists(path)
            todo.append((i, path))
    remove_stale_temps(args.output_folder, [path for _, path in todo])   # left by a killed run of this rank
    log.info("rank %d: %d samples to write, %d already finished, kept Euler steps %s of %d", rank, len(todo),
             counts["skipped"], keep, len(grid))
    compute_dtype = None if args.dtype == "fp32" else DTYPES[args.dtype]
    batches = [todo[k:k + args.batch_size] for k in range(0, len(todo), args.batch_size)]
    for batch in tqdm(batches, unit="batch", disable=rank != 0, desc="ODE trajectories"):
        items = [dataset[i] for i, _ in batch]
        for (i, _), item in zip(batch, items):
            if item["clean_latent"].shape[0] < num_frames:
                raise UserError(f"sample {i} has {item['clean_latent'].shape[0]} latent frames, the config wants "
                                f"{num_frames}")
        clean = torch.stack([item["clean_latent"][:num_frames] for item in items]).to(device)   # [B, F, C, H, W]
        seeds = [torch.Generator().manual_seed((args.seed << 32) + i) for i, _ in batch]   # sample i's own noise
        noise = torch.cat([torch.randn(clean[:1].shape, generator=g) for g in seeds]).to(device)
        prompts = [item["prompts"] for item in items]
        guidance = Guidance(text_encoder.encode(prompts).float(), negative, args.guidance_scale)
        traj = ode_trajectory(model, scheduler, grid, keep, guidance, clean, noise, compute_dtype).cpu()
        for (_, path), prompt, sample in zip(batch, prompts, traj):
            with AtomicPath(path) as tmp:   # the final name only ever holds a complete file
                torch.save({prompt: sample[None].clone()}, tmp)
            counts["computed"] += 1
    return counts


def _reduce(counts: dict[str, int], world_size: int) -> dict[str, int]:
    """Sum the counts over ranks (a gloo group just for this, and as the final barrier)."""
    if world_size == 1:
        return counts
    import torch.distributed as dist

    dist.init_process_group("gloo")
    values = torch.tensor(list(counts.values()), dtype=torch.long)
    dist.all_reduce(values)
    dist.destroy_process_group()
    return dict(zip(counts, values.tolist()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, world_size, _ = _world()
    start = time.perf_counter()
    try:
        check_args(args)
        counts = generate(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = _reduce(counts, world_size)
    seconds = time.perf_counter() - start
    if rank == 0:
        rate = counts["computed"] / seconds if seconds > 0 else 0.0
        print(f"{counts['computed']} trajectories written to {args.output_folder} ({counts['redone']} partial files "
              f"redone), {counts['skipped']} already finished; {seconds:.1f} s on {world_size} rank(s), "
              f"{rate:.2f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
