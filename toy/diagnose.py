r"""Where does the toy world lose what a prompt asks for? The measurements of issue 27, as one command.

    python -m toy.diagnose --out output/toy_diagnose.json                    # the shipped models
    python -m toy.diagnose --workdir build/toy --out diag.json               # every stage of a recipe run
    python -m toy.diagnose --parts ceiling vae --num_clips 48                # only the data side
    python -m toy.diagnose --parts models --prompts prompts/toy_eval.txt --num_samples 2 --num_real 64 \
        --out output/toy_eval48.json                                         # the 48-prompt evaluation protocol
    python -m toy.diagnose --compare A.json B.json                           # A minus B, paired by prompt
    python -m toy.diagnose --compare A.json R.json:evaluation_prompts/model:base_50   # a results file's group
    python -m toy.diagnose --by_attribute A.json --compare_keys frame0_present   # per prompted colour, shape, ...
    python -m toy.diagnose --frame0_confusions A.json B.json                 # what a missed frame 0 shows instead

Parts (``--parts``, all by default), each scored by the toy detector (:mod:`toy.eval`):

* ``ceiling``: the detector on ground-truth clips (held-out and training splits of :func:`toy.world.make_split`):
  what a perfect generator would score;
* ``vae``: the same clips encoded and decoded by the toy VAE (the path every generated video takes at its end): is an
  attribute lost before any diffusion model is involved? Also the spread (std) of each latent frame over the clips;
* ``models``: samples of the base (50 solver steps, CFG 3) and of every stage's model (``--workdir``: the recipe's
  checkpoints, rows as in :func:`toy.recipe.table_rows`; otherwise the shipped base and generators): per attribute,
  shape confusion, frame 0, wobble and colour drift (:func:`toy.eval.track_diagnostics`), each mean with a 95%
  bootstrap interval over prompts. The prompts are the ground-truth clips' captions, or ``--prompts``
  (``prompts/toy_eval.txt``: the 48 evaluation prompts, 16 of them attribute combinations held out of training);
* ``exposure``: causal models sampled twice from the same noise: rolled out (each block reads the model's own
  earlier blocks, as in inference) and teacher-forced (each block reads the encoded ground-truth clip's earlier
  blocks, as in Stage-1 training). Drift that appears only when rolled out is exposure bias;
* ``frames``: each model's x0 prediction from the encoded clips noised to ``--frame_timesteps``, in the form its
  training sees them (the base: the whole clip; causal models: teacher forcing on the clean clip), as a relative
  error per latent frame (``|x0_pred - x0|^2 / |x0|^2``), how often the decoded prediction shows the captioned
  object in pixel frame 0 against the later frames, and how much of latent frame 0's own channel code (its mean
  offset from the later frames) the prediction carries. A first frame that is predicted as well as the others here but
  comes out empty in the samples would be a training/inference mismatch of the first block; one that is predicted
  worse here is a weakness of the model itself.

The ground-truth clips are those of :func:`toy.world.make_split` with seed ``--seed + 17``, never the recipe's own
training clips; their captions mix attribute combinations seen and held out in training. *Seen* / *held-out* in the
output always refer to the training split of ``--seed`` (:func:`toy.world.split_combinations`; the shipped models:
seed 0). Videos are generated in batches of ``--batch`` (a batch shares one seed: its videos differ from
inference.py's one-by-one videos of the same seed, not in kind). Everything runs in-process and writes no video
files unless ``--video_folder`` asks for them; ``--threads 1`` suits a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from toy.eval import SCORES, bootstrap_interval, evaluate_clips
from toy.recipe import CONFIGS, MODEL, REPO, Row, table_rows
from toy.world import format_caption, make_split, split_combinations
from utils.errors import UserError

log = logging.getLogger("toy.diagnose")
PARTS = ("ceiling", "vae", "models", "exposure", "frames")
SHIPPED_ROWS = ("base_50", "dmd_framewise_4", "dmd_chunkwise_4")
EXPOSURE_ROWS = ("ar_framewise_50", "ar_chunkwise_50", "dmd_framewise_4", "dmd_chunkwise_4")
CLIP_SEED_OFFSET = 17   # ground-truth clips of seed + 17: never the recipe's training clips (its --seed)


def clips_for(num: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """``num`` captioned ground-truth clips of seed ``seed + 17``: half from each side of that seed's split (more
    different combinations than ``num`` clips of one side)."""
    train, heldout = make_split(num - num // 2, num // 2, seed + CLIP_SEED_OFFSET)
    return heldout + train


def split_scores(rows: list[dict], seed: int) -> dict:
    """Faithfulness of the videos whose prompt's attribute combination was seen in / held out of the training split
    of ``seed``, each with its count and 95% bootstrap interval over prompts."""
    heldout = {format_caption(c) for c in split_combinations(seed=seed)[1]}
    out = {}
    for key, wanted in (("seen", False), ("heldout", True)):
        part = [r for r in rows if (r["prompt"] in heldout) == wanted]
        out[f"faithfulness_{key}"] = float(np.mean([r["faithfulness"] for r in part])) if part else None
        out[f"count_{key}"] = len(part)
        out[f"interval95_{key}"] = bootstrap_interval(part, "faithfulness")
    return out


def score(prompts: list[str], clips: list[np.ndarray], num_real: int = 0, seed: int = 0,
          per_video: bool = False) -> dict:
    """:func:`toy.eval.evaluate_clips` (real clips for the distance: ``make_split`` of ``seed``), its aggregate
    completed by the shape confusion (``"circle->square"``: count), the number of videos whose frame 0 misses the
    object (and of them, how many show an object of another colour there) and the seen / held-out split
    (:func:`split_scores`); per-video rows only with ``per_video``."""
    result = evaluate_clips(prompts, clips, num_real=num_real, real_seed=seed)
    agg = result["aggregate"]
    agg["shape_confusion"] = dict(Counter(f"{r['target']['shape']}->{r['detected']['shape']}"
                                          for r in result["videos"]))
    agg["frame0_missing"] = int(sum(not r["frame0_present"] for r in result["videos"]))
    # of those, the videos whose frame 0 shows an object of another colour (the rest show none)
    agg["frame0_other_color"] = int(sum(not r["frame0_present"] and r["frame0_color"] is not None
                                        for r in result["videos"]))
    agg.update(split_scores(result["videos"], seed))
    if not per_video:
        del result["videos"]
    return result


def chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


@torch.no_grad()
def vae_roundtrip(vae, clips: list[np.ndarray], batch: int = 4) -> tuple[list[np.ndarray], dict]:
    """Clips through ``WanVAE.encode`` and ``decode`` (the pipelines' normalised latents and streaming decoder), and
    statistics of their latents: ``latent_std_per_frame``, each latent frame's standard deviation over all clips (how
    visible a frame is under the same noise), and ``frame0_channel_offset``, per channel the distance of latent frame
    0's mean from the later frames' mean in units of their standard deviation (how differently the first frame, one
    pixel frame encoded alone, is coded)."""
    from toy.vae import videos_to_tensor
    from utils.video import pixels_to_uint8

    out, latents = [], []
    for part in chunks(clips, batch):
        latents.append(vae.encode(videos_to_tensor(part).to(vae.device)))
        out += list(pixels_to_uint8(vae.decode(latents[-1])).cpu().numpy())
    z = torch.cat(latents).float()                                                     # [B, F, C, h, w]
    later = z[:, 1:].transpose(1, 2).flatten(2)                                        # [B, C, (F-1) h w]
    offset = (z[:, 0].mean((0, 2, 3)) - later.mean((0, 2))).abs() / later.std((0, 2))
    return out, {"latent_std_per_frame": [round(float(z[:, f].std()), 3) for f in range(z.shape[1])],
                 "frame0_channel_offset": [round(float(v), 2) for v in offset]}, z


LATENT_NOISE = (0.25, 0.5, 1.0)


@torch.no_grad()
def latent_noise_presence(vae, clips: list[tuple[str, np.ndarray]], z: torch.Tensor, seed: int,
                          batch: int = 4) -> dict:
    """``{sigma: [presence per latent frame]}``: every latent of ``z`` plus Gaussian noise of std ``sigma`` times the
    later frames' std (the same absolute error on every frame, as a generator's error is), decoded; for each latent
    frame, the fraction of the pixel frames it codes (frame 0: pixel frame 0; frame f: pixel frames 4f-3..4f) in which
    the detector still finds the object. How fragile each frame's decode is."""
    scale = float(z[:, 1:].std())
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for sigma in LATENT_NOISE:
        noisy = z + sigma * scale * torch.randn(z.shape, generator=gen).to(z.device)
        present = np.asarray([track.present for track in decoded_tracks(vae, clips, noisy, batch)], dtype=float)
        groups = [[0]] + [list(range(4 * f - 3, 4 * f + 1)) for f in range(1, z.shape[1])]
        out[str(sigma)] = [round(float(present[:, g].mean()), 3) for g in groups]
    return out


@torch.no_grad()
def decoded_tracks(vae, clips: list[tuple[str, np.ndarray]], latents: torch.Tensor, batch: int = 4) -> list:
    """The toy detector's track of each clip's captioned object in the decode of its ``latents``."""
    from toy.eval import detect_object
    from toy.world import parse_caption
    from utils.video import pixels_to_uint8

    tracks = []
    for k in range(0, len(clips), batch):
        videos = pixels_to_uint8(vae.decode(latents[k:k + batch])).cpu().numpy()
        tracks += [detect_object(v, parse_caption(c)["color"]) for (c, _), v in zip(clips[k:k + batch], videos)]
    return tracks


@torch.no_grad()
def frame0_code_swap(vae, clips: list[tuple[str, np.ndarray]], z: torch.Tensor, decoded: list[np.ndarray],
                     batch: int = 4) -> dict:
    """What latent frame 0's own code is worth: pixel frame 0 decoded from each clip's latents as they are and with
    latent frame 0 replaced by latent frame 1 (the code of pixel frames 1-4, where the object has barely moved): the
    fraction of clips whose frame 0 shows the object in its colour, and the median RGB distance of what is found
    there from the same clip's round-trip frame 0. A generator that writes a later frame's code into the first slot
    gets the swapped numbers. ``decoded``: the round trip's decodes of ``z`` (uint8 clips)."""
    from toy.eval import detect_object
    from toy.world import parse_caption

    swapped = z.clone()
    swapped[:, 0] = z[:, 1]
    tracks = {"as_coded": [detect_object(v, parse_caption(c)["color"]) for (c, _), v in zip(clips, decoded)],
              "frame1_code": decoded_tracks(vae, clips, swapped, batch)}
    rgb = {key: [track.rgb[0] for track in found] for key, found in tracks.items()}
    distance = [float(np.linalg.norm(a - b)) for a, b in zip(rgb["frame1_code"], rgb["as_coded"])
                if not (np.isnan(a).any() or np.isnan(b).any())]
    return {"frame0_present": {key: round(float(np.mean([t.present[0] for t in found])), 3)
                               for key, found in tracks.items()},
            "frame0_rgb_shift_median": round(float(np.median(distance)), 1) if distance else None}


@torch.no_grad()
def color_separation(vae, size: tuple[int, int, int], num_settings: int = 12, batch: int = 4) -> dict:
    """How far apart the VAE codes the palette's colours, in latent frame 0 and in the later frames. For each of
    ``num_settings`` shape / direction / speed / start settings the target object is rendered alone (no distractors)
    in every colour, and once in the background's colour (an empty clip), as clips of ``size`` (frames, height,
    width); each clip is encoded. The distance of two
    colours in latent frame f is the norm of their latents' difference over channels and positions, in units of
    frame f's spread over all these clips, averaged over the settings. ``pairs``: per colour pair, that distance in
    frame 0, its mean over the later frames and their ratio; ``empty``: the same for each colour against the empty
    clip. A ratio well below 1 is a pair that frame 0's code keeps closer than the later frames do."""
    from itertools import combinations

    from toy.vae import videos_to_tensor
    from toy.world import BACKGROUND, COLORS, DIRECTIONS, SHAPES, SPEED_ADVERBS, make_video

    names = list(COLORS)
    z = {}
    for name in (*names, "empty"):
        videos = []
        for k in range(num_settings):
            attrs = {"shape": SHAPES[k % len(SHAPES)], "direction": list(DIRECTIONS)[k % len(DIRECTIONS)],
                     "speed": list(SPEED_ADVERBS)[k % len(SPEED_ADVERBS)], "color": names[0]}
            rgb = BACKGROUND if name == "empty" else COLORS[name]
            videos.append(make_video(attrs, *size, np.random.default_rng(k), num_distractors=0, rgb=rgb))
        z[name] = torch.cat([vae.encode(videos_to_tensor(part).to(vae.device)).float().cpu()
                             for part in chunks(videos, batch)])                       # [N, F, C, h, w]
    spread = torch.cat(list(z.values())).std(dim=(0, 2, 3, 4))                         # per latent frame

    def distance(a: str, b: str) -> dict:
        d = (z[a] - z[b]).flatten(2).norm(dim=2).mean(0) / spread                     # [F]
        return {"frame0": round(float(d[0]), 2), "later": round(float(d[1:].mean()), 2),
                "ratio": round(float(d[0] / d[1:].mean()), 2)}

    pairs = {f"{a}-{b}": distance(a, b) for a, b in combinations(names, 2)}
    return {"pairs": dict(sorted(pairs.items(), key=lambda kv: kv[1]["frame0"])),
            "empty": {name: distance(name, "empty") for name in names}, "settings": num_settings}


def vae_part(vae, clips: list[tuple[str, np.ndarray]], seed: int) -> dict:
    """Scores of the round-tripped clips, with their latents' statistics (:func:`vae_roundtrip`), how each latent
    frame's decode survives noise (:func:`latent_noise_presence`), what frame 0's own code is worth
    (:func:`frame0_code_swap`) and how far apart it keeps the colours (:func:`color_separation`)."""
    decoded, stats, z = vae_roundtrip(vae, [v for _, v in clips])
    return {**score([c for c, _ in clips], decoded, seed=seed), **stats,
            "latent_noise_presence": latent_noise_presence(vae, clips, z, seed),
            "frame0_code_swap": frame0_code_swap(vae, clips, z, decoded),
            "color_separation": color_separation(vae, clips[0][1].shape[:3])}


# ---------------------------------------------------------------------------------------------------------------------
# models


def row_config(row: Row, wan_models_dir: Path, overrides: tuple[str, ...] = ()):
    from utils.config import load_config

    return load_config(CONFIGS / row.config, [f"wan_models_dir={wan_models_dir}", *row.overrides, *overrides])


def base_clips(cfg, prompts: list[str], seed: int, batch: int, device: torch.device) -> list[np.ndarray]:
    """The bidirectional base model of ``cfg`` as the table's base row samples it (:class:`toy.recipe.BaseSampler`:
    50 solver steps with CFG), ``batch`` prompts at a time."""
    from toy.recipe import BaseSampler
    from utils.video import pixels_to_uint8

    sample = BaseSampler(cfg, str(device))
    out = []
    for k, part in enumerate(chunks(prompts, batch)):
        out += list(pixels_to_uint8(sample.batch(part, seed + k)).cpu().numpy())
    return out


@torch.no_grad()
def causal_clips(cfg, checkpoint: str | None, use_ema: bool, prompts: list[str], seed: int, batch: int,
                 device: torch.device) -> list[np.ndarray]:
    """A causal generator streamed as inference.py streams it (float32 on the CPU, bf16 on a GPU), in batches."""
    from pipeline.streaming import StreamingPipeline

    pipe = StreamingPipeline.from_config(cfg, checkpoint, use_ema, device=device, fast=False)
    out = []
    for k, part in enumerate(chunks(prompts, batch)):
        out += list(pipe.generate(part, seed=seed + k).frames)   # uint8 [B, T, H, W, 3]
    return out


def has_ema(checkpoint: Path) -> bool:
    """Whether a release checkpoint holds ``generator_ema`` (read memory-mapped: the weights stay on disk)."""
    obj = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return isinstance(obj, dict) and "generator_ema" in obj


def available_rows(workdir: Path | None) -> list[tuple[Row, str | None, Path]]:
    """``(row, checkpoint or None for the config's own, wan_models_dir)`` of every model there is to sample."""
    rows = {r.name: r for r in table_rows()}
    if workdir is None:
        return [(rows[name], None, REPO / "assets" / "toy") for name in SHIPPED_ROWS]
    base = workdir / "models" / "base"
    out = []
    for row in rows.values():
        ckpt = workdir / "checkpoints" / f"{row.stage}.pt"
        if row.stage == "base" and (base / MODEL).is_dir():
            out.append((row, None, base))
        elif row.stage != "base" and ckpt.is_file() and (not row.use_ema or has_ema(ckpt)):
            out.append((row, str(ckpt), base))
    return out


def sample_row(row: Row, checkpoint: str | None, models_dir: Path, prompts: list[str], seed: int, batch: int,
               device: torch.device, overrides: tuple[str, ...] = ()) -> list[np.ndarray]:
    cfg = row_config(row, models_dir, overrides)
    if row.stage == "base":
        return base_clips(cfg, prompts, seed, batch, device)
    return causal_clips(cfg, checkpoint, row.use_ema, prompts, seed, batch, device)


def write_videos(folder: Path, prompts: list[str], num_samples: int, clips: list[np.ndarray], fps: int) -> None:
    """The clips as mp4s named as inference.py names them (``<prompt>-<k>.mp4``), when ffmpeg is at hand (the GPU
    machines have none: there the scores alone come back)."""
    from utils.video import mp4_writer_missing, safe_output_name, write_mp4

    if missing := mp4_writer_missing():
        log.warning("no videos written to %s: %s", folder, missing)
        return
    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    names = [safe_output_name(p, used=used) for p in prompts]
    paths = [folder / (f"{n}-{k}.mp4" if num_samples > 1 else f"{n}.mp4") for n in names for k in range(num_samples)]
    for path, clip in zip(paths, clips):
        write_mp4(path, clip, fps=fps)


# ---------------------------------------------------------------------------------------------------------------------
# exposure bias


@torch.no_grad()
def block_latents(pipe, guidance, noise: torch.Tensor, context_noise: float, seed: int,
                  context: torch.Tensor | None = None) -> torch.Tensor:
    """Latents ``[B, F, C, h, w]`` of ``pipe``'s generator from ``noise``, block by block through a fresh cache:
    rolled out (``context`` None: each context pass writes the block's own prediction) or teacher-forced (block b's
    context pass writes ``context[:, b]``). The re-noising draws come from ``seed``, so both see the same noise."""
    from model.kv_cache import KVCache
    from pipeline.causal import BlockLoop, randn_like_from

    cache = KVCache.for_model(pipe.generator, noise.shape[0] * (2 if guidance.batched else 1), *noise.shape[-2:],
                              capacity_frames=noise.shape[1], dtype=pipe.dtype, device=noise.device)
    loop = BlockLoop(pipe.generator, pipe.scheduler, pipe.schedule, guidance, cache, context_noise=context_noise,
                     noise_fn=randn_like_from(torch.Generator(noise.device).manual_seed(seed)))
    return torch.cat([x for _, x in loop.run(noise, context_latents=context, commit_last=False)], 1)


@torch.no_grad()
def rolled_and_forced(cfg, checkpoint: str | None, use_ema: bool, clips: list[tuple[str, np.ndarray]],
                      seed: int, device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The clips' captions sampled from the same noise twice (one batch, :func:`block_latents`): rolled out, and
    teacher-forced on the clips' encoded latents."""
    from pipeline.causal import Guidance
    from pipeline.streaming import StreamingPipeline
    from toy.vae import videos_to_tensor
    from utils.video import pixels_to_uint8

    pipe = StreamingPipeline.from_config(cfg, checkpoint, use_ema, device=device, fast=False)
    negative = pipe.encode([cfg.negative_prompt]) if pipe.guidance_scale != 1.0 else None
    truth = pipe.vae.encode(videos_to_tensor([c for _, c in clips]).to(device, pipe.dtype))   # [B, F, C, h, w]
    noise = torch.randn(truth.shape, generator=torch.Generator(device).manual_seed(seed), device=device,
                        dtype=pipe.dtype)
    guidance = Guidance(pipe.encode([caption for caption, _ in clips]), negative, pipe.guidance_scale)
    out = []
    for context in (None, truth):
        x0 = block_latents(pipe, guidance, noise, float(cfg.context_noise), seed + 1, context)
        out.append(list(pixels_to_uint8(pipe.vae.decode(x0)).cpu().numpy()))
    return out[0], out[1]


@torch.no_grad()
def frame_errors(row: Row, checkpoint: str | None, models_dir: Path, clips: list[tuple[str, np.ndarray]],
                 timesteps: list[float], seed: int, device: torch.device) -> tuple[dict, dict]:
    """``{t: [relative x0 error of latent frame f]}`` of one model over the clips (one batch), see the module doc, and
    ``{t: {"frame0": p0, "later": p, "frame0_code": c}}``: the share of clips whose decoded x0 prediction shows the
    captioned object in pixel frame 0, and in the later frames on average (``t = "0"``: the clean latents, the VAE's
    round trip), and how much of latent frame 0's own code the prediction carries: its per-channel offset of frame 0
    from the later frames projected on the clean latents' (1: all of it; 0: frame 0 predicted as a later frame)."""
    from model.vae import WanVAE
    from pipeline import components
    from toy.vae import videos_to_tensor

    cfg = row_config(row, models_dir)
    if row.stage == "base":
        model = components.build_bidirectional(cfg, cfg.generator_name, device=device)
    else:
        model = components.build_generator(cfg, checkpoint, row.use_ema, device=device, dtype=torch.float32)
    model.eval()
    encoder = components.build_text_encoder(cfg, device=device, dtype=torch.float32, output_device=device)
    scheduler = components.build_scheduler(cfg)
    vae = WanVAE.from_pretrained(models_dir / MODEL / "vae").to(device)
    x0 = vae.encode(videos_to_tensor([c for _, c in clips]).to(device))                 # [B, F, C, h, w]
    context = encoder.encode([caption for caption, _ in clips])
    gen = torch.Generator(device).manual_seed(seed)

    def code(z: torch.Tensor) -> torch.Tensor:   # per channel, latent frame 0's mean minus the later frames'
        return z[:, 0].mean((0, 2, 3)) - z[:, 1:].mean((0, 1, 3, 4))

    offset = code(x0)

    def presence(latents: torch.Tensor) -> dict:
        tracks = decoded_tracks(vae, clips, latents)
        return {"frame0": round(float(np.mean([t.present[0] for t in tracks])), 3),
                "later": round(float(np.mean([t.present[1:].mean() for t in tracks])), 3),
                "frame0_code": round(float(code(latents) @ offset / (offset @ offset)), 3)}

    out, present = {}, {"0": presence(x0)}
    for t in timesteps:
        tt = torch.full(x0.shape[:2], float(t), device=device)
        x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen, device=device), tt)
        flow = model(x_t, tt, context) if row.stage == "base" else \
            model.forward_teacher_forcing(x_t, tt, context, clean_x=x0)
        x0_pred = scheduler.flow_to_x0(flow, x_t, tt)
        error = (x0_pred - x0).square().sum((0, 2, 3, 4)) / x0.square().sum((0, 2, 3, 4))
        out[str(int(t))] = [round(float(e), 4) for e in error]
        present[str(int(t))] = presence(x0_pred)
    return out, present


def scored_videos(spec: str) -> list[dict]:
    """The per-video scores in ``FILE[:[GROUP/]ENTRY]``: a result JSON of this module or of ``toy.recipe``'s eval
    folder (``ENTRY`` names the part, e.g. ``model:base_50``; without it the file must hold one entry with videos),
    or a file under ``benchmarks/results`` that nests such results in groups (``evaluation_prompts/model:base_50``)."""
    path, _, entry = spec.partition(":")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read a result JSON ({err})") from err
    *groups, entry = entry.split("/")
    for group in groups:
        inner = data.get(group)
        if not isinstance(inner, dict):
            groups_here = sorted(k for k, v in data.items() if isinstance(v, dict))
            raise UserError(f"{path}: no group {group!r}; it has {groups_here or 'none'}")
        data = inner
    found = {k: v["videos"] for k, v in data.items() if isinstance(v, dict) and v.get("videos")}
    if entry:
        if entry not in found:
            raise UserError(f"{path}: no entry {entry!r} with per-video scores; it has {sorted(found) or 'none'}")
        return found[entry]
    if len(found) != 1:
        raise UserError(f"{path}: {len(found)} entries with per-video scores ({sorted(found)}); name one as "
                        f"{path}:ENTRY (a run written without --per_video keeps none)")
    return next(iter(found.values()))


def compare(spec_a: str, spec_b: str, keys: list[str], seed: int) -> dict:
    """A minus B for each score in ``keys``, paired by prompt, with a 95% bootstrap interval over prompts
    (:func:`toy.eval.paired_difference`); ``frame0_present`` and the 0/1 scores become rates."""
    from toy.eval import paired_difference

    a, b = scored_videos(spec_a), scored_videos(spec_b)
    for spec, videos in ((spec_a, a), (spec_b, b)):
        if missing := [k for k in keys if k not in videos[0]]:
            raise UserError(f"{spec}: no per-video score {missing}; it has {sorted(videos[0])}")
    return {"a": spec_a, "b": spec_b, "videos": [len(a), len(b)],
            "differences": {k: paired_difference(a, b, k, seed=seed) for k in keys}}


def by_attribute(specs: list[str], keys: list[str]) -> dict:
    """For each result file and each per-video score in ``keys``: its mean over the videos whose prompt asks for each
    colour, shape, direction and speed (``frame0_present`` as a rate). Which prompts a failure follows."""
    from toy.world import parse_caption

    out, counts = {}, {}
    for spec in specs:
        videos = scored_videos(spec)
        if missing := [k for k in keys if k not in videos[0]]:
            raise UserError(f"{spec}: no per-video score {missing}; it has {sorted(videos[0])}")
        counts[spec] = len(videos)
        groups: dict[tuple[str, str], list[dict]] = {}
        for video in videos:
            for attribute, value in parse_caption(video["prompt"]).items():
                groups.setdefault((attribute, value), []).append(video)
        out[spec] = {key: {attribute: {value: round(float(np.mean([float(v[key]) for v in found])), 3)
                                       for (a, value), found in sorted(groups.items()) if a == attribute}
                           for attribute in SCORES}
                     for key in keys}
    return {"by_attribute": out, "videos": counts}


def frame0_confusions(specs: list[str]) -> dict:
    """What the videos that miss the object in frame 0 show there instead, over result files: counts of ``"asked>
    shown"`` (the prompt's colour, the colour of frame 0's largest object, ``none`` for an empty frame), summed
    over every set of per-video scores each ``FILE`` holds (in any group), or over the one ``FILE:[GROUP/]ENTRY``
    names; ``unordered`` adds the two directions of each colour pair."""
    sets: dict[str, list[dict]] = {}
    for spec in specs:
        if ":" in spec:
            sets[spec] = scored_videos(spec)
            continue
        try:
            data = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{spec}: cannot read a result JSON ({err})") from err

        def walk(node, path: str):
            if not isinstance(node, dict):
                return
            videos = node.get("videos")
            if isinstance(videos, list) and videos and isinstance(videos[0], dict):
                sets[f"{spec}:{path}"] = videos
            for key, value in node.items():
                walk(value, f"{path}/{key}" if path else key)

        walk(data, "")
    if not sets:
        raise UserError(f"no per-video scores in {specs} (a run written without --per_video keeps none)")
    counts: Counter = Counter()
    per_set = {}
    for name, videos in sets.items():
        if "frame0_color" not in videos[0]:
            raise UserError(f"{name}: its videos have no frame0_color (scored before it was recorded)")
        missed = [f"{v['target']['color']}>{v['frame0_color'] or 'none'}" for v in videos if not v["frame0_present"]]
        counts.update(missed)
        per_set[name] = {"videos": len(videos), "missed": len(missed)}
    unordered: Counter = Counter()
    for key, n in counts.items():
        asked, shown = key.split(">")
        unordered["-".join(sorted((asked, shown))) if shown != "none" else key] += n
    return {"sets": per_set, "confusions": dict(counts.most_common()), "unordered": dict(unordered.most_common())}


def format_confusions(result: dict) -> str:
    videos = sum(s["videos"] for s in result["sets"].values())
    missed = sum(s["missed"] for s in result["sets"].values())
    lines = [f"{len(result['sets'])} sets, {videos} videos, frame 0 missed in {missed}; asked>shown:"]
    lines += [f"  {key} {n}" for key, n in result["confusions"].items()]
    lines.append("colour pairs: " + ", ".join(f"{key} {n}" for key, n in result["unordered"].items()))
    return "\n".join(lines)


def format_by_attribute(result: dict) -> str:
    lines = []
    for spec, scores in result["by_attribute"].items():
        lines.append(f"{spec} ({result['videos'][spec]} videos)")
        for key, attributes in scores.items():
            lines.append(f"  {key}: " + " | ".join(" ".join(f"{value} {mean:.2f}" for value, mean in values.items())
                                                   for values in attributes.values()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default=None, help="a toy.recipe workdir: diagnose the models of its stages (None: the "
                                                   "shipped base and generators in assets/toy)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, metavar="PART",
                   help=f"measurements to make, of {', '.join(PARTS)} (the module docstring says what each is)")
    p.add_argument("--num_clips", type=int, default=24, help="ground-truth clips (and, without --prompts, prompts)")
    p.add_argument("--prompts", default=None, help="prompt file of the models part (None: the clips' captions; "
                                                   "prompts/toy_eval.txt: the 48 evaluation prompts)")
    p.add_argument("--num_samples", type=int, default=1, help="videos per prompt and model in the models part")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help="models of every part, as toy.recipe's table rows (base_50, dmd_framewise_4, ...; None: all "
                        "there are)")
    p.add_argument("--exposure_rows", nargs="+", default=list(EXPOSURE_ROWS), metavar="ROW",
                   help="causal models compared rolled out vs teacher-forced and, with the base, measured by the "
                        "frames part (those of them that exist)")
    p.add_argument("--exposure_clips", type=int, default=16, help="clips of the exposure and frames parts")
    p.add_argument("--frame_timesteps", type=float, nargs="+", default=[500.0, 800.0, 950.0], metavar="T",
                   help="noise levels (shifted-grid timesteps, 0-1000) of the frames part")
    p.add_argument("--num_real", type=int, default=0,
                   help="held-out real clips (make_split of --seed) for the Fréchet / nearest-neighbour distance of "
                        "the models part; 0 skips it")
    p.add_argument("--per_video", action="store_true", help="keep every video's scores in the JSON")
    p.add_argument("--video_folder", default=None,
                   help="also write the models part's videos as mp4 into <video_folder>/<row>/ (needs ffmpeg)")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config values for every sampled model, e.g. guidance_scale=1.5")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; also the training split of the seen / held-out scores and the ground-truth "
                        "clips' seed (+17)")
    p.add_argument("--batch", type=int, default=None, help="videos generated together (None: 96 on a GPU, 8 on a "
                                                            "CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compare", nargs=2, default=None, metavar="FILE[:[GROUP/]ENTRY]",
                   help="instead of the parts: A minus B per score, paired by prompt, from two result JSONs with "
                        "per-video scores (this module's with --per_video, a recipe's eval/<row>.json, or a group "
                        "of a benchmarks/results file, e.g. F.json:evaluation_prompts/model:base_50)")
    p.add_argument("--by_attribute", nargs="+", default=None, metavar="FILE[:[GROUP/]ENTRY]",
                   help="instead of the parts: each --compare_keys score of these result JSONs averaged over the "
                        "videos of each prompted colour, shape, direction and speed")
    p.add_argument("--frame0_confusions", nargs="+", default=None, metavar="FILE[:[GROUP/]ENTRY]",
                   help="instead of the parts: what the videos that miss frame 0 show there (the prompt's colour > "
                        "frame 0's), counted over every per-video set of these result JSONs")
    p.add_argument("--compare_keys", nargs="+", default=["faithfulness", *SCORES, "frame0_present"], metavar="KEY",
                   help="per-video scores --compare and --by_attribute report")
    p.add_argument("--out", default="output/toy_diagnose.json", help="JSON with every part's numbers")
    return p


def check_args(args) -> None:
    """Flag values that cannot work, as one-line errors before any model is built."""
    for flag in ("num_clips", "num_samples", "exposure_clips"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be >= 1 (leave it out for the device's default), got {args.batch}")
    known = [r.name for r in table_rows()]
    for flag in ("rows", "exposure_rows"):
        unknown = [name for name in getattr(args, flag) or [] if name not in known]
        if unknown:
            raise UserError(f"--{flag} {' '.join(unknown)}: not a toy.recipe table row; rows: {', '.join(known)}")
    if args.workdir and not Path(args.workdir).is_dir():
        raise UserError(f"--workdir {args.workdir}: no such folder (a toy.recipe --workdir, or leave it out for the "
                        f"shipped models)")
    if args.prompts and not Path(args.prompts).is_file():
        raise UserError(f"--prompts {args.prompts}: no such file (one prompt a line, e.g. prompts/toy_eval.txt)")


def select_rows(workdir: Path | None, names: list[str] | None) -> list[tuple[Row, str | None, Path]]:
    """:func:`available_rows`, only those of ``names`` (all when None); a named row without a model is an error."""
    rows = available_rows(workdir)
    if names is None:
        return rows
    missing = sorted(set(names) - {r.name for r, _, _ in rows})
    if missing:
        where = workdir or "assets/toy"
        raise UserError(f"--rows {' '.join(missing)}: no model for it in {where}; there are: "
                        f"{', '.join(r.name for r, _, _ in rows) or 'none'}")
    return [r for r in rows if r[0].name in names]


def models_part(args, rows, prompts: list[str], batch: int, device: torch.device) -> dict:
    """``{"model:<row>": scores}``: ``--num_samples`` videos of every prompt from every row's model."""
    jobs = [p for p in prompts for _ in range(args.num_samples)]
    out = {}
    for row, ckpt, where in rows:
        start = time.perf_counter()
        clips = sample_row(row, ckpt, where, jobs, args.seed, batch, device, tuple(args.override))
        made = time.perf_counter() - start
        if args.video_folder:
            write_videos(Path(args.video_folder) / row.name, prompts, args.num_samples, clips,
                         row_config(row, where).fps)
        result = score(jobs, clips, args.num_real, args.seed, args.per_video)
        result["seconds_per_video"] = made / len(jobs)   # model building included
        result["seconds"] = round(time.perf_counter() - start, 1)
        log.info("model:%s: faithfulness %.3f", row.name, result["aggregate"]["faithfulness"])
        out[f"model:{row.name}"] = result
    return out


def run(args) -> dict:
    check_args(args)
    device = torch.device(args.device)
    batch = args.batch or (96 if device.type == "cuda" else 8)
    clips = clips_for(args.num_clips, args.seed)
    captions = [c for c, _ in clips]
    workdir = Path(args.workdir).resolve() if args.workdir else None
    rows = select_rows(workdir, args.rows)
    result: dict = {"command": "python -m toy.diagnose " + " ".join(sys.argv[1:]), "device": str(device)}

    def timed(name, fn):
        start = time.perf_counter()
        result[name] = fn()
        result[name]["seconds"] = round(time.perf_counter() - start, 1)
        log.info("%s: faithfulness %.3f", name, result[name]["aggregate"]["faithfulness"])

    if "ceiling" in args.parts:
        timed("ceiling", lambda: score(captions, [v for _, v in clips], seed=args.seed))
    if "vae" in args.parts:
        from model.vae import WanVAE

        models_dir = workdir / "models" / "base" if workdir else REPO / "assets" / "toy"
        vae = WanVAE.from_pretrained(models_dir / MODEL / "vae").to(device)
        timed("vae", lambda: vae_part(vae, clips, args.seed))
    if "models" in args.parts:
        if args.prompts:
            from utils.datasets import TextDataset

            prompts = list(TextDataset(args.prompts).prompts)
        else:
            prompts = captions
        result.update(models_part(args, rows, prompts, batch, device))
    few = clips[:args.exposure_clips]
    if "exposure" in args.parts:
        for row, ckpt, where in rows:
            if row.name not in args.exposure_rows or row.stage == "base":
                continue
            start = time.perf_counter()
            rolled, forced = rolled_and_forced(row_config(row, where, tuple(args.override)), ckpt, row.use_ema, few,
                                               args.seed, device)
            result[f"exposure:{row.name}"] = {"rolled_out": score([c for c, _ in few], rolled, seed=args.seed),
                                              "teacher_forced": score([c for c, _ in few], forced, seed=args.seed),
                                              "seconds": round(time.perf_counter() - start, 1)}
            log.info("exposure %s done", row.name)
    if "frames" in args.parts:
        for row, ckpt, where in rows:
            if row.stage == "base" or row.name in args.exposure_rows:
                result[f"frames:{row.name}"], result[f"frame0_x0:{row.name}"] = frame_errors(
                    row, ckpt, where, few, args.frame_timesteps, args.seed, device)
                log.info("frames %s: %s", row.name, result[f"frames:{row.name}"])
    return result


SUMMARY_COLUMNS = ("faithfulness", "faithfulness_seen", "faithfulness_heldout", *SCORES, "frame0_missing",
                   "frame0_area_ratio", "jitter_px", "presence_early", "presence_late", "color_error_early",
                   "color_error_late")


def format_summary(result: dict) -> str:
    """One line per measured set: the attributes and the track diagnostics."""
    short = {"faithfulness_seen": "seen", "faithfulness_heldout": "held-out"}
    lines = ["set".ljust(36) + "".join(short.get(c, c)[:12].rjust(13) for c in SUMMARY_COLUMNS)]

    def line(name, agg):
        cells = [("-" if agg.get(c) is None else f"{agg[c]:.3f}" if isinstance(agg[c], float) else str(agg[c]))
                 for c in SUMMARY_COLUMNS]
        lines.append(name[:36].ljust(36) + "".join(c.rjust(13) for c in cells))

    for name, value in result.items():
        if not isinstance(value, dict):
            continue
        if name.startswith("frames:"):
            for t, errors in value.items():
                cells = " ".join(f"{e:.2f}" for e in errors)
                lines.append(f"{name} t={t}: relative x0 error per latent frame {cells}")
        elif name.startswith("frame0_x0:"):
            cells = ", ".join(f"t={t}: {p['frame0']:.2f} / {p['later']:.2f}" for t, p in value.items())
            lines.append(f"{name}: object found in the decoded x0 prediction, frame 0 / later frames: {cells}")
            cells = ", ".join(f"t={t}: {p['frame0_code']:.2f}" for t, p in value.items() if "frame0_code" in p)
            lines.append(f"{name}: share of frame 0's own channel code in the x0 prediction: {cells}")
        elif name.startswith("exposure:"):
            for kind in ("rolled_out", "teacher_forced"):
                line(f"{name[len('exposure:'):]} {kind}", value[kind]["aggregate"])
        else:
            line(name, value["aggregate"])
            if "latent_std_per_frame" in value:
                spread = " ".join(f"{v:.2f}" for v in value["latent_std_per_frame"])
                offset = value["frame0_channel_offset"]
                lines.append(f"{name}: latent std per frame {spread}; frame-0 channel offset mean "
                             f"{sum(offset) / len(offset):.2f}, max {max(offset):.2f} (later frames' std)")
                for sigma, presence in value.get("latent_noise_presence", {}).items():
                    cells = " ".join(f"{p:.2f}" for p in presence)
                    lines.append(f"{name}: latents + noise {sigma} x std: object present per latent frame {cells}")
                if "color_separation" in value:
                    closest = list(value["color_separation"]["pairs"].items())[:6]
                    lines.append(f"{name}: colour pairs closest in latent frame 0 (distance, later frames, ratio): "
                                 + ", ".join(f"{k} {d['frame0']:.1f} / {d['later']:.1f} / {d['ratio']:.2f}"
                                             for k, d in closest))
                if "frame0_code_swap" in value:
                    swap = value["frame0_code_swap"]
                    lines.append(f"{name}: frame 0 present as coded {swap['frame0_present']['as_coded']:.2f}, with "
                                 f"latent frame 1's code {swap['frame0_present']['frame1_code']:.2f}; colour moved "
                                 f"{swap['frame0_rgb_shift_median']} RGB (median)")
    return "\n".join(lines)


def format_comparison(result: dict) -> str:
    lines = [f"A = {result['a']} ({result['videos'][0]} videos), B = {result['b']} ({result['videos'][1]} videos)"]
    for key, d in result["differences"].items():
        lines.append(f"{key}: A - B = {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] over "
                     f"{d['prompts']} prompts" if d else f"{key}: no prompt in common")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if sum(map(bool, (args.compare, args.by_attribute, args.frame0_confusions))) > 1:
            raise UserError("--compare, --by_attribute and --frame0_confusions: one at a time")
        if args.frame0_confusions:
            result, summary = frame0_confusions(args.frame0_confusions), format_confusions
        elif args.compare:
            result, summary = compare(*args.compare, args.compare_keys, args.seed), format_comparison
        elif args.by_attribute:
            result, summary = by_attribute(args.by_attribute, args.compare_keys), format_by_attribute
        else:
            result, summary = run(args), format_summary
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    summary = summary(result)
    sys.stdout.write(summary + f"\nwritten to {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
