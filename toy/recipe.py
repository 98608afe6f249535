"""The toy-world recipe (issues 9, 27): every Causal Forcing stage on synthetic clips, end to end, with the
project's tools.

    python -m toy.recipe --device cuda --jobs 16 --ship --ship_base   # the full recipe: one GPU, ~14 minutes
    python -m toy.recipe --workdir /tmp/toy --quick                    # a few steps per stage (CI, tests; CPU)

Stages, each a subprocess of an entry point users run themselves (``train.py``, ``get_causal_ode_data.py``,
``utils/create_lmdb_iterative.py``, ``python -m toy.diagnose``) with a ``configs/toy/*.yaml`` file and
``--override`` for the paths, chained through the checkpoint files they write:

1. data: synthetic training clips (``toy.world.make_split``), rendered in memory and encoded into a latent LMDB with
   the toy VAE (``app.encode_videos``);
2. base: the bidirectional toy base model from random weights (it stands in for Wan2.1 and is Stage 3's real score
   and critic initialisation); its weights (its EMA where the stage keeps one) become
   ``<workdir>/models/base/Toy-T2V``;
3. Stage 1 (teacher-forcing AR diffusion) frame-wise and chunk-wise, from the base;
4. Stage 2: causal ODE pairs of the Stage-1 model + ODE regression, and separately causal consistency distillation;
5. Stage 3: DMD from the ODE models (4-step frame-/chunk-wise, 2- and 1-step frame-wise), the paper's ablations
   (DMD from the causal CD model; DMD from the Stage-1 model without Stage 2), and Rolling Forcing frame-wise;
6. videos for every row of the results table (48 prompts x 2 by default), each row as soon as its model exists,
   scored by the toy detector: ``<workdir>/toy_results.md`` (docs/toy_results.md quotes the shipped run's).

Run time: the later stages' defaults (``max_steps`` of configs/toy) were planned for one GPU call of under 10 minutes
with ``--jobs 16`` (stages that do not read each other run side by side: the toy networks are far too small to fill a
GPU); measured, Stages 1-3 from the shipped base (``--base_weights``) take 285-453 s on an H100 (two machines), the
base's 2600 steps add about 420 s with its frame-0 image term (docs/toy_results.md has the stage times). On a CPU the
base alone takes hours; ``--steps_scale`` scales every stage.

Every stage is skipped when its output file already exists, so an interrupted run continues where it stopped (and
``train.py`` itself resumes inside a stage). Logs of each subprocess: ``<workdir>/logs/<stage>.log``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

CONFIGS = REPO / "configs" / "toy"
MODEL = "Toy-T2V"
VARIANTS = ("framewise", "chunkwise")
STUDENT_STEPS = [1000, 750, 500, 250]

# Trained stages: name -> (configs/toy file, stage whose checkpoint initialises the generator, or None).
STAGES = {
    "base": ("bidirectional_base.yaml", None),
    "ar_framewise": ("ar_diffusion_tf_framewise.yaml", None),
    "ar_chunkwise": ("ar_diffusion_tf_chunkwise.yaml", None),
    "ode_framewise": ("causal_ode_framewise.yaml", "ar_framewise"),
    "ode_chunkwise": ("causal_ode_chunkwise.yaml", "ar_chunkwise"),
    "cd_framewise": ("causal_cd_framewise.yaml", "ar_framewise"),
    "cd_chunkwise": ("causal_cd_chunkwise.yaml", "ar_chunkwise"),
    "dmd_framewise": ("causal_forcing_dmd_framewise.yaml", "ode_framewise"),
    "dmd_chunkwise": ("causal_forcing_dmd_chunkwise.yaml", "ode_chunkwise"),
    "dmd_framewise_2step": ("causal_forcing_dmd_framewise_2step.yaml", "ode_framewise"),
    "dmd_framewise_1step": ("causal_forcing_dmd_framewise_1step.yaml", "ode_framewise"),
    "dmd_framewise_from_ar": ("causal_forcing_dmd_framewise.yaml", "ar_framewise"),   # ablation: no Stage 2
    "dmd_framewise_from_cd": ("causal_forcing_dmd_framewise.yaml", "cd_framewise"),   # Stage 2b instead of 2a
    "dmd_rolling_framewise": ("rolling_forcing_dmd_framewise.yaml", "ode_framewise"),  # long video
}
QUICK_ROWS = ("base_50", "dmd_framewise_4", "dmd_chunkwise_4", "dmd_rolling_framewise_4")
QUICK = dict(steps=2, n_train=8, n_heldout=4, ode_samples=4, batch_size=2, num_prompts=2, num_samples=1)


@dataclass
class Row:
    """One line of the results table: a model sampled with one schedule."""

    name: str                      # also the sample folder's name
    label: str                     # model column
    steps: str                     # sampling column
    stage: str                     # checkpoint stage ("base" = the bidirectional base folder)
    config: str                    # configs/toy file used for inference
    overrides: list[str] = field(default_factory=list)
    use_ema: bool = False


def table_rows() -> list[Row]:
    """The results table of the issue, in order."""
    few = [f"denoising_step_list=[{','.join(map(str, STUDENT_STEPS))}]", "warp_denoising_step=true"]
    rows = [Row("base_50", "base (bidirectional)", "50, CFG 3", "base", "bidirectional_base.yaml")]
    for v in VARIANTS:
        rows += [Row(f"ar_{v}_50", f"Stage 1 AR {v}", "50, CFG 3", f"ar_{v}", f"ar_diffusion_tf_{v}.yaml"),
                 Row(f"ar_{v}_4", f"Stage 1 AR {v} (undistilled)", "4", f"ar_{v}", f"ar_diffusion_tf_{v}.yaml", few),
                 Row(f"ode_{v}_4", f"causal ODE init {v}", "4", f"ode_{v}", f"causal_ode_{v}.yaml"),
                 Row(f"cd_{v}_4", f"causal CD init {v} (EMA)", "4", f"cd_{v}", f"causal_cd_{v}.yaml", use_ema=True),
                 Row(f"dmd_{v}_4", f"Causal Forcing DMD {v}", "4", f"dmd_{v}", f"causal_forcing_dmd_{v}.yaml"),
                 # the same stage's EMA weights: sampled where the stage keeps an EMA (Recipe.keeps_ema)
                 Row(f"dmd_{v}_4_ema", f"Causal Forcing DMD {v} (EMA)", "4", f"dmd_{v}", f"causal_forcing_dmd_{v}.yaml",
                     use_ema=True)]
    rows += [Row("dmd_framewise_2", "Causal Forcing DMD framewise", "2 (block 0: 4)", "dmd_framewise_2step",
                 "causal_forcing_dmd_framewise_2step.yaml"),
             Row("dmd_framewise_1", "Causal Forcing DMD framewise", "1 (block 0: 4)", "dmd_framewise_1step",
                 "causal_forcing_dmd_framewise_1step.yaml"),
             Row("dmd_framewise_from_cd_4", "Causal Forcing DMD framewise, from causal CD", "4",
                 "dmd_framewise_from_cd", "causal_forcing_dmd_framewise.yaml"),
             Row("dmd_framewise_from_ar_4", "DMD from Stage 1, no Stage 2 (ablation)", "4", "dmd_framewise_from_ar",
                 "causal_forcing_dmd_framewise.yaml"),
             Row("dmd_rolling_framewise_4", "Rolling Forcing DMD framewise", "4, rolling windows",
                 "dmd_rolling_framewise", "rolling_forcing_dmd_framewise.yaml")]
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# progress display


class Progress:
    """Stage headers with elapsed times; while a subprocess runs, a one-line ticker (on a terminal) shows its last
    log line."""

    def __init__(self, total: int, parallel: bool = False):
        self.total, self.index, self.start = total, 0, time.perf_counter()
        self.parallel = parallel          # stages run side by side: no ticker, "done" lines name their stage
        self.tty = sys.stdout.isatty() and not parallel
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()

    def _clock(self, seconds: float) -> str:
        return time.strftime("%H:%M:%S", time.gmtime(seconds))

    def begin(self, name: str, what: str) -> float:
        with self._lock:
            self.index += 1
            say(f"[{self.index:2d}/{self.total}] {self._clock(time.perf_counter() - self.start)}  {name}: {what}")
        return time.perf_counter()

    def end(self, name: str, started: float, note: str = "") -> None:
        seconds = time.perf_counter() - started
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        who = f"{name} " if self.parallel else ""
        say(f"        {who}done in {seconds:.1f} s{(' - ' + note) if note else ''}")

    def skip(self, name: str, why: str, count: int = 1) -> None:
        with self._lock:
            self.index += count
            say(f"[{self.index:2d}/{self.total}] {name}: skipped ({why})")

    def watch(self, proc: subprocess.Popen, log_path: Path, started: float) -> None:
        """Block until ``proc`` ends, refreshing the ticker once a second on a terminal."""
        if not self.tty:
            proc.wait()
            return
        while proc.poll() is None:
            last = _last_line(log_path)[: shutil.get_terminal_size((100, 20)).columns - 24]
            sys.stdout.write(f"\r\033[K        {time.perf_counter() - started:6.0f} s | {last}")
            sys.stdout.flush()
            time.sleep(1.0)
        sys.stdout.write("\r\033[K")


def say(text: str) -> None:
    """One line of the progress display (this is a command-line script: stdout is its interface)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 2048))
            text = f.read().decode("utf-8", "replace").replace("\r", "\n")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------------------------------------------
# the recipe


class Recipe:
    """Paths, step counts and the stage runners of one recipe run (``args`` from :func:`build_parser`)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.quick = args.quick
        self.device = args.device or _default_device()
        self.env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if self.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""   # train.py and the ODE script pick CUDA when they see it
        self.steps = self._step_counts()
        self.stage_overrides = self._stage_overrides()
        self.progress: Progress | None = None

    # --- layout ---------------------------------------------------------------------------------------------------
    def models(self, which: str) -> Path:
        """``init`` (random DiT + toy encoder/VAE) or ``base`` (trained base DiT): a wan_models_dir."""
        return self.work / "models" / which

    def ckpt(self, stage: str) -> Path:
        return self.work / "checkpoints" / f"{stage}.pt"

    @property
    def clean_data(self) -> Path:
        return self.work / "dataset" / "clean_data"

    @property
    def train_prompts(self) -> Path:
        return self.work / "dataset" / "train_prompts.txt"

    def _step_counts(self) -> dict[str, int]:
        """Steps per trained stage: the config's max_steps x --steps_scale, then --steps NAME=N, --quick last."""
        from utils.config import load_config

        counts, self.save_every = {}, {}
        for name, (config, _) in STAGES.items():
            cfg = load_config(CONFIGS / config)
            counts[name] = max(1, round(cfg.max_steps * self.args.steps_scale))
            self.save_every[name] = cfg.log_iters
        for item in self.args.steps:
            name, _, value = item.partition("=")
            if name not in STAGES or not value.isdigit():
                raise SystemExit(f"--steps {item!r}: expected NAME=N with NAME one of {', '.join(STAGES)}")
            counts[name] = int(value)
        if self.quick:
            counts = {name: QUICK["steps"] for name in counts}
        return counts

    def _stage_overrides(self) -> dict[str, list[str]]:
        """``--stage_override STAGE:KEY=VALUE``, grouped by stage (given after ``--override`` to that stage alone)."""
        out: dict[str, list[str]] = {}
        for item in self.args.stage_override:
            name, _, override = item.partition(":")
            if name not in STAGES or "=" not in override:
                raise SystemExit(f"--stage_override {item!r}: expected STAGE:KEY=VALUE with STAGE one of "
                                 f"{', '.join(STAGES)}")
            out.setdefault(name, []).append(override)
        return out

    def size(self, key: str):
        return QUICK[key] if self.quick else getattr(self.args, key)

    # --- running subprocesses -------------------------------------------------------------------------------------
    def launcher(self) -> list[str]:
        """``python`` or, with ``--nproc N`` > 1, ``torchrun --standalone --nproc_per_node N`` (batch is per rank)."""
        if self.args.nproc <= 1:
            return [sys.executable]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.args.nproc}"]

    def run(self, name: str, cmd: list[str], what: str) -> None:
        """Run ``cmd`` from the repo root, output to ``logs/<name>.log``; on failure print the log's tail and stop."""
        log_path = self.work / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = self.progress.begin(name, what)
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
            self.progress.watch(proc, log_path, started)
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            say("\n".join([f"        FAILED (exit {proc.returncode}); last lines of {log_path}:"] + tail))
            raise SystemExit(f"stage {name} failed")
        self.progress.end(name, started)

    def train(self, name: str) -> Path:
        """``train.py`` for one stage; the release export of its last step becomes ``checkpoints/<name>.pt``."""
        out = self.ckpt(name)
        if out.is_file():
            self.progress.skip(name, f"{out} exists")
            return out
        config, init = STAGES[name]
        steps = self.steps[name]
        logdir = self.work / "logs" / name
        # checkpoints at the config's interval (a killed run resumes there) and always at the last step
        overrides = [*self.args.override, *self.stage_overrides.get(name, []), f"max_steps={steps}",
                     f"log_iters={min(steps, self.save_every[name])}",
                     f"log_every={max(1, min(50, steps // 4))}",
                     f"wan_models_dir={self.models('init' if name == 'base' else 'base')}"]
        if init is not None:
            overrides.append(f"generator_ckpt={self.ckpt(init)}")
        overrides.append(f"data_path={self._data_for(name)}")
        if self.quick:
            overrides.append(f"batch_size={QUICK['batch_size']}")
        cmd = self.launcher() + ["train.py", "--config_path", str(CONFIGS / config), "--logdir", str(logdir),
                                 "--override", *overrides]
        self.run(name, cmd, f"train.py {config}, {steps} steps" + (f", from {init}" if init else ""))
        from utils.checkpoint import release_path

        release = release_path(logdir, steps)
        if not release.is_file():
            raise SystemExit(f"stage {name}: train.py wrote no {release}")
        from utils.io import AtomicPath

        with AtomicPath(out) as tmp:   # whole or absent: a stage of another run may be waiting for it (--only)
            shutil.copyfile(release, tmp)
        return out

    def keeps_ema(self, name: str) -> bool:
        """Does stage ``name``'s checkpoint hold (or, not trained yet, will it hold) ``generator_ema``? Its export
        does when ``ema_weight > 0`` and the last step is past ``ema_start_step``."""
        if self.ckpt(name).is_file():
            from toy.diagnose import has_ema

            return has_ema(self.ckpt(name))
        from utils.config import load_config

        cfg = load_config(CONFIGS / STAGES[name][0], [*self.args.override, *self.stage_overrides.get(name, [])])
        return cfg.ema_weight > 0 and self.steps[name] > cfg.ema_start_step

    def _data_for(self, name: str) -> Path:
        if name.startswith("ode_"):
            return self.work / "dataset" / f"ODE_{name[len('ode_'):]}"
        if name.startswith("dmd_"):
            return self.train_prompts
        return self.clean_data

    # --- data and model folders -----------------------------------------------------------------------------------
    def make_model_folders(self) -> None:
        """``models/init/Toy-T2V``: the toy encoder, tokenizer and VAE of ``--model_folder`` with a randomly
        initialised DiT of ``toy.folders.TOY_DIT`` (edited by ``--dit``): the architecture is the recipe's, not the
        folder's, so a run does not inherit the shipped model's size."""
        from model.weights import WAN_DIT_WEIGHTS

        init = self.models("init") / MODEL
        wanted = self.dit_config()
        if (init / WAN_DIT_WEIGHTS).is_file():
            if json.loads((init / "config.json").read_text()) != wanted:
                raise SystemExit(f"{init} holds another DiT config than toy.folders.TOY_DIT with --dit; use a new "
                                 f"--workdir")
            self.progress.skip("models", f"{init} exists")
            return
        started = self.progress.begin("models", "toy UMT5 + tokenizer + VAE, random DiT")
        source = Path(self.args.model_folder)
        note = f"encoder, tokenizer, VAE from {source}; DiT {' '.join(self.args.dit) or 'TOY_DIT'}"
        if not (source / "config.json").is_file():
            source, note = self._stand_in_folder(), "STAND-IN: no assets/toy/Toy-T2V yet, random tiny encoder and VAE"
        tmp = init.with_name(init.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _copy_folder_without_dit(source, tmp)
        (tmp / "config.json").write_text(json.dumps(wanted, indent=2) + "\n")
        _write_random_dit(tmp, self.args.seed)
        tmp.rename(init)
        self.progress.end("models", started, note)

    def dit_config(self) -> dict:
        """``config.json`` of the DiT every stage trains: ``TOY_DIT`` with the ``--dit`` edits."""
        from toy.folders import TOY_DIT

        return _dit_config({"_class_name": "WanModel", **TOY_DIT.to_dict()}, self.args.dit)

    def _stand_in_folder(self) -> Path:
        """A random folder of the toy sizes (untrained VAE) for runs before assets/toy/Toy-T2V exists."""
        import toy.folders as tiny
        from toy.world import all_combinations, format_caption

        folder = self.models("stand_in") / MODEL
        if not (folder / "config.json").is_file():
            sizes = dict(dit=getattr(tiny, "TOY_DIT", tiny.TINY_DIT), t5=getattr(tiny, "TOY_T5", None),
                         vae=getattr(tiny, "TOY_VAE", None))
            if hasattr(tiny, "toy_words"):
                sizes["words"] = tiny.toy_words()
            tiny.write_tiny_wan_folder(folder, **sizes, sentences=[format_caption(c) for c in all_combinations()])
        return folder

    def make_data(self) -> None:
        """Synthetic clips rendered in memory (in parallel parts) and encoded by the toy VAE into the clean-data LMDB
        (``app.encode_videos.encode_videos_to_lmdb``, behind ``python -m app.encode_videos``): no mp4
        round trip, which saves a minute on a GPU and needs no ffmpeg (the GPU machines have none)."""
        if (self.clean_data / "data.mdb").is_file():
            self.progress.skip("data", f"{self.clean_data} exists", count=2)
            return
        started = self.progress.begin("clips", f"{self.size('n_train')} synthetic training clips")
        clips = self._render_clips()
        self.progress.end("clips", started, self._write_prompts(clips))
        started = self.progress.begin("encode", "encode the clips with the toy VAE")
        self._encode(clips)
        self.progress.end("encode", started)

    def _render_clips(self) -> list:
        from toy.world import split_combinations
        from utils.config import load_config

        cfg = load_config(CONFIGS / "base.yaml")
        n, train = self.size("n_train"), split_combinations(seed=self.args.seed)[0]
        size = dict(num_frames=cfg.num_frames, height=cfg.height, width=cfg.width, combinations=train)
        parts = [(min(RENDER_PART, n - first), first) for first in range(0, n, RENDER_PART)]
        # make_split's training clips, part by part (sample i depends only on (seed, i))
        spawn = multiprocessing.get_context("spawn")   # this process has torch's threads: no fork
        with ProcessPoolExecutor(min(len(parts), os.cpu_count() or 1), mp_context=spawn) as pool:
            done = pool.map(_render_part, [(count, self.args.seed, first, size) for count, first in parts])
            return [clip for part in done for clip in part]

    def _write_prompts(self, clips: list) -> str:
        captions = list(dict.fromkeys(caption for caption, _ in clips))   # Stage 3 trains on the seen captions
        self.train_prompts.parent.mkdir(parents=True, exist_ok=True)
        self.train_prompts.write_text("\n".join(captions) + "\n")
        return f"{len(captions)} distinct training captions"

    def _encode(self, clips: list) -> None:
        import torch

        from app.encode_videos import encode_videos_to_lmdb
        from model.vae import WanVAE

        vae = WanVAE.from_pretrained(self.models("init") / MODEL / "vae").to(self.device)
        tmp = self.clean_data.with_name(self.clean_data.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.no_grad():
            encode_videos_to_lmdb(clips, vae, tmp, batch_size=64 if self.device == "cuda" else 8)
        shutil.rmtree(self.clean_data, ignore_errors=True)
        tmp.rename(self.clean_data)

    def seed_base(self, source: Path) -> None:
        """``checkpoints/base.pt`` (float32) from a trained base's weights (``--base_weights``): the base stage is
        then skipped as done."""
        import torch

        from model.loader import read_state_dict
        from utils.io import AtomicPath

        sd = read_state_dict(str(source))
        with AtomicPath(self.ckpt("base")) as tmp:
            torch.save({k: v.float() for k, v in sd.items()}, tmp)
        say(f"base: {len(sd)} tensors from {source} -> {self.ckpt('base')}")

    def export_base(self) -> None:
        """The trained base model as a Wan folder ``models/base/Toy-T2V`` (real score, critic, Stage-1 init)."""
        from safetensors.torch import save_file

        from model.weights import WAN_DIT_WEIGHTS

        folder = self.models("base") / MODEL
        if (folder / WAN_DIT_WEIGHTS).is_file():
            return
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _copy_folder_without_dit(self.models("init") / MODEL, tmp)
        sd = self.base_weights()
        save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp / WAN_DIT_WEIGHTS))
        tmp.rename(folder)

    def base_weights(self) -> dict:
        """The base's released weights: its EMA where the checkpoint keeps one (``ema_weight > 0`` in the base stage),
        as a released base such as Wan2.1 is, else its trained weights. Every stage after it, its table row and
        ``--ship_base`` use these."""
        from model.loader import read_state_dict
        from toy.diagnose import has_ema

        use_ema = has_ema(self.ckpt("base"))
        say(f"        base weights: {'generator_ema' if use_ema else 'generator'} of {self.ckpt('base')}")
        return read_state_dict(str(self.ckpt("base")), use_ema=use_ema)

    def ode_data(self, variant: str) -> None:
        """ODE pairs of the Stage-1 model (``get_causal_ode_data.py``) -> LMDB (``create_lmdb_iterative.py``)."""
        lmdb = self.work / "dataset" / f"ODE_{variant}"
        name = f"ode_data_{variant}"
        if (lmdb / "data.mdb").is_file():
            self.progress.skip(name, f"{lmdb} exists", count=2)
            return
        latents, tmp = lmdb.with_name(lmdb.name + "_latents"), lmdb.with_name(lmdb.name + ".tmp")
        samples, steps = self.size("ode_samples"), 8 if self.quick else self.args.ode_steps
        self.run(name, self.launcher() + [
            "get_causal_ode_data.py", "--config_path", str(CONFIGS / f"ar_diffusion_tf_{variant}.yaml"),
            "--generator_ckpt", str(self.ckpt(f"ar_{variant}")), "--rawdata_path", str(self.clean_data),
            "--output_folder", str(latents), "--max_samples", str(samples), "--num_steps", str(steps),
            "--guidance_scale", str(self.args.ode_guidance), "--seed", str(self.args.seed),
            "--batch_size", str(ODE_BATCH if self.device == "cuda" else 4),
            "--override", *self.args.override, f"wan_models_dir={self.models('base')}"],
            f"{samples} teacher-forced ODE trajectories ({steps} Euler steps, CFG {self.args.ode_guidance})")
        shutil.rmtree(tmp, ignore_errors=True)
        self.run(f"ode_lmdb_{variant}", [sys.executable, "utils/create_lmdb_iterative.py", "--data_path", str(latents),
                                         "--lmdb_path", str(tmp)], "trajectory LMDB (one row per distinct caption)")
        tmp.rename(lmdb)

    # --- sampling and evaluation ----------------------------------------------------------------------------------
    def score_row(self, row: Row, prompts: Path) -> dict:
        """Videos of one table row, made and scored in one ``python -m toy.diagnose --parts models`` process (the
        streaming pipeline as inference.py runs it, or the base's 50-step sampler; the toy detector on the frames in
        memory). mp4s of them go to ``samples/<row>/`` where ffmpeg is at hand. Returns the evaluation (per-video
        rows, aggregate with seen / held-out faithfulness, distance to real clips)."""
        out = self.work / "eval" / f"{row.name}.json"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            self.run(f"row_{row.name}", [
                sys.executable, "-m", "toy.diagnose", "--workdir", str(self.work), "--parts", "models", "--rows",
                row.name, "--prompts", str(prompts), "--num_samples", str(self.size("num_samples")),
                "--num_real", str(self.size("n_heldout")), "--seed", str(self.args.seed), "--per_video",
                "--device", self.device, "--video_folder", str(self.work / "samples"), "--out", str(out),
                *(["--override", *self.args.override] if self.args.override else [])], f"{row.label}, {row.steps}")
        return json.loads(out.read_text())[f"model:{row.name}"]

    def ship(self) -> None:
        """Frame-wise and chunk-wise DMD generators -> ``assets/toy/checkpoints/<v>/causal_forcing.pt`` (bf16)."""
        import torch

        from model.weights import WAN_DIT_WEIGHTS

        for v in VARIANTS:
            target = REPO / "assets" / "toy" / "checkpoints" / v / "causal_forcing.pt"
            export_bf16(self.ckpt(f"dmd_{v}"), target)
            say(f"        shipped {target.relative_to(REPO)} ({target.stat().st_size / 2**20:.1f} MiB)")
        if self.args.ship_base:
            from safetensors.torch import save_file

            target = REPO / "assets" / "toy" / MODEL / WAN_DIT_WEIGHTS
            sd = self.base_weights()
            save_file({k: t.to(torch.bfloat16).contiguous() for k, t in sd.items()}, str(target))
            shutil.copyfile(self.models("init") / MODEL / "config.json", target.parent / "config.json")
            say(f"        shipped the base model into {target.relative_to(REPO)}")


# ----------------------------------------------------------------------------------------------------------------------
# helpers


class BaseSampler:
    """The bidirectional base sampled as the results table's base row: ``sample_steps`` steps of its
    ``sample_solver`` with CFG (inference.py streams causal generators only). ``sample(prompt, seed)`` -> frames
    ``[T, 3, H, W]`` in [-1, 1]."""

    def __init__(self, cfg, device: str):
        import torch

        from pipeline import components
        from pipeline.causal import StepSchedule

        self.cfg, self.device = cfg, torch.device(device)
        self.model = components.build_bidirectional(cfg, cfg.generator_name, device=self.device).eval()
        self.encoder = components.build_text_encoder(cfg, device=self.device, dtype=torch.float32,
                                                     output_device=self.device)
        self.vae = components.build_vae(cfg, device=self.device)
        self.scheduler = components.build_scheduler(cfg)
        self.schedule = StepSchedule.multistep(self.scheduler, cfg.sample_steps, cfg.timestep_shift, cfg.sample_solver)
        self.negative = self.encoder.encode([cfg.negative_prompt])

    def __call__(self, prompt: str, seed: int):
        return self.batch([prompt], seed)[0]

    def batch(self, prompts: list[str], seed: int):
        """Frames ``[B, T, 3, H, W]`` of the prompts sampled together (one noise draw of ``seed`` for the batch; a
        batch of one is ``self(prompt, seed)``)."""
        import torch

        from toy.bidirectional import sample_bidirectional

        gen = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn((len(prompts), *self.cfg.image_or_video_shape[1:]), generator=gen, device=self.device)
        with torch.no_grad():
            x0 = sample_bidirectional(self.model, self.scheduler, noise, self.encoder.encode(list(prompts)),
                                      self.schedule, self.negative, self.cfg.guidance_scale)
            return self.vae.decode(x0)


RENDER_PART = 256   # clips rendered by one worker process
ODE_BATCH = 64      # ODE trajectories integrated together on a GPU


def _render_part(job: tuple) -> list:
    """``make_dataset(count, seed, first=first, **size)`` in a worker process of :meth:`Recipe._render_clips`."""
    from toy.world import make_dataset

    count, seed, first, size = job
    return make_dataset(count, seed, first=first, **size)


def export_bf16(checkpoint: Path, target: Path, use_ema: bool | None = None) -> None:
    """A stage's generator as a bf16 release checkpoint (what ``--ship`` and a device call bring back): by default
    (``use_ema=None``) its EMA weights where it kept an EMA (what its ``_ema`` row samples, as the published
    frame-wise generator is used with ``--use_ema``), written as the file's ``generator``, so the shipped config needs
    no ``--use_ema``; ``use_ema=False`` / ``True`` picks the raw / EMA weights."""
    import torch

    from model.loader import read_state_dict, save_release_checkpoint
    from toy.diagnose import has_ema

    sd = read_state_dict(str(checkpoint), use_ema=has_ema(checkpoint) if use_ema is None else use_ema)
    save_release_checkpoint(target, {k: t.to(torch.bfloat16) for k, t in sd.items()})


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _copy_folder_without_dit(source: Path, target: Path) -> None:
    """Copy a Wan folder except the DiT weights at its top level (``vae/`` keeps its own safetensors)."""
    from model.weights import WAN_DIT_WEIGHTS

    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder).resolve() == source.resolve()
        return [n for n in names if top and (n == WAN_DIT_WEIGHTS or n.startswith(WAN_DIT_WEIGHTS.split(".")[0] + "-"))
                or top and n.endswith(".index.json")]

    shutil.copytree(source, target, ignore=ignore)


def _dit_config(config: dict, edits: list[str]) -> dict:
    """``config.json`` of the toy DiT with ``--dit KEY=VALUE`` edits (values parsed as JSON: 256, [1,1,1])."""
    from model.wan import WanConfig

    out = dict(config)
    for item in edits:
        key, sep, value = item.partition("=")
        if not sep or key not in WanConfig.__dataclass_fields__:
            raise SystemExit(f"--dit {item!r}: expected KEY=VALUE with KEY a WanConfig field "
                             f"({', '.join(WanConfig.__dataclass_fields__)})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"--dit {item!r}: the value must be JSON (a number, true/false or a list)") from None
    return out


def _write_random_dit(folder: Path, seed: int) -> None:
    """A randomly initialised DiT of the folder's ``config.json`` as its ``diffusion_pytorch_model.safetensors``."""
    import torch
    from safetensors.torch import save_file

    from model.loader import read_model_config
    from model.wan import WanModel
    from model.weights import WAN_DIT_WEIGHTS

    torch.manual_seed(seed)
    model = WanModel(read_model_config(str(folder)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WAN_DIT_WEIGHTS))


def step_times(logdir: Path) -> float | None:
    """Mean seconds per training step from ``metrics.jsonl`` (the first logged interval, with start-up, left out
    when there are later ones)."""
    path = logdir / "metrics.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "step_time" in r]
    elif logdir.with_suffix(".log").is_file():   # the stage's console log (train.py prints every metrics row)
        text = logdir.with_suffix(".log").read_text(errors="replace")
        rows = [{"step_time": float(v)} for v in re.findall(r"\| step_time ([0-9.]+)", text)]
    else:
        return None
    if len(rows) > 1:
        rows = rows[1:]
    return sum(r["step_time"] for r in rows) / len(rows) if rows else None


# ----------------------------------------------------------------------------------------------------------------------
# results


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(agg: dict, key: str) -> str:
    """``0.83 [0.78, 0.88]``: the mean and its 95% bootstrap interval over prompts."""
    low_high = agg.get("interval95", {}).get(key)
    return _fmt(agg[key]) + ("" if not low_high else f" [{low_high[0]:.2f}, {low_high[1]:.2f}]")


# The paper's ordering checks (Causal Forcing, its ablations): (better row, worse row, what it shows).
ORDERING = [
    ("dmd_framewise_4", "dmd_framewise_from_ar_4", "DMD from the causal ODE model beats DMD from Stage 1"),
    ("dmd_framewise_from_cd_4", "dmd_framewise_from_ar_4", "DMD from the causal CD model beats DMD from Stage 1"),
    ("dmd_framewise_4", "ar_framewise_4", "frame-wise: distilled 4-step beats undistilled Stage 1 at 4 steps"),
    ("dmd_chunkwise_4", "ar_chunkwise_4", "chunk-wise: distilled 4-step beats undistilled Stage 1 at 4 steps"),
]


def ordering_checks(results: dict[str, dict]) -> list[str]:
    """Markdown lines: each check of :data:`ORDERING` whose rows were scored, with the paired difference of
    faithfulness (prompt by prompt) and its 95% bootstrap interval; it holds when the interval lies above 0."""
    from toy.eval import paired_difference

    lines = []
    for better, worse, claim in ORDERING:
        if better in results and worse in results:
            d = paired_difference(results[better]["videos"], results[worse]["videos"])
            verdict = "holds" if d["low"] > 0 else "not shown" if d["high"] > 0 else "reversed"
            lines.append(f"| {claim} | `{better}` − `{worse}` | {d['difference']:+.2f} [{d['low']:+.2f}, "
                         f"{d['high']:+.2f}] | {verdict} |")
    return lines


def results_markdown(recipe: Recipe, command: str, results: list[tuple[Row, dict]], seconds: float) -> str:
    """The run's results: the table with intervals, the ordering checks, stage timings and per-step times."""
    from toy.eval import CHANCE

    n = recipe.size("num_samples")
    prompts = len({v["prompt"] for v in results[0][1]["videos"]}) if results else 0
    chance = ", ".join(f"{'colour' if k == 'color' else k} {v:.3g}" for k, v in CHANCE.items())
    lines = ["# Toy-world recipe results", "",
             "Produced by `toy/recipe.py` (every stage through train.py / get_causal_ode_data.py with "
             "configs/toy/*.yaml; each row's videos made and scored by `python -m toy.diagnose --parts models`). "
             f"Chance: {chance}. Faithfulness = mean "
             "of colour/shape/direction/speed correct, with its 95% bootstrap interval over prompts; *seen* / "
             "*held-out* = prompts whose attribute combination was / was not in the training split; *frame 0* = "
             "videos whose first frame misses the object; *wobble* = RMS distance (px) of the object's centroid from "
             "a straight track (real clips: 0.06); *late* = share of the last third of the frames that show the "
             "object in its colour. Fréchet and NN ratio compare per-clip features with held-out real clips (lower "
             "is better; NN ratio 1 = as close as real clips are to each other).", "", "```", command, "```", "",
             f"Device: {recipe.device}; {prompts} prompts x {n} samples per row; total wall time "
             f"{seconds / 60:.1f} min.", "",
             "| model | steps | faithful | seen | held-out | colour | shape | direction | speed | frame 0 | wobble "
             "| late | Fréchet | NN ratio | s/video |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, res in results:
        a, d = res["aggregate"], res.get("distance", {})
        lines.append(f"| {row.label} | {row.steps} | {_ci(a, 'faithfulness')} | {_fmt(a['faithfulness_seen'])} | "
                     f"{_fmt(a['faithfulness_heldout'])} | {_ci(a, 'color')} | {_ci(a, 'shape')} | "
                     f"{_ci(a, 'direction')} | {_ci(a, 'speed')} | {a['frame0_missing']}/{a['count']} | "
                     f"{_fmt(a['jitter_px'])} | {_fmt(a['presence_late'])} | {_fmt(d.get('frechet'), 3)} | "
                     f"{_fmt(d.get('nearest_neighbour_ratio'))} | {_fmt(res.get('seconds_per_video'))} |")
    checks = ordering_checks({row.name: res for row, res in results})
    if checks:
        lines += ["", "Ordering checks (faithfulness, paired by prompt):", "",
                  "| claim | rows | difference [95% interval] | verdict |", "|---|---|---|---|", *checks]
    lines += ["", "Training stages (steps as run; seconds per step from each run's metrics.jsonl, first logged "
                  "interval excluded when there are more):", "",
              "| stage | config | steps | s/step | stage wall s |", "|---|---|---|---|---|"]
    for name, (config, _) in STAGES.items():
        lines.append(f"| {name} | configs/toy/{config} | {recipe.steps[name]} | "
                     f"{_fmt(step_times(recipe.work / 'logs' / name), 3)} | "
                     f"{_fmt(recipe.progress.timings.get(name), 1)} |")
    other = {k: v for k, v in recipe.progress.timings.items() if k not in STAGES and not k.startswith("row_")}
    lines += ["", "Other steps (wall seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in other.items()), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Stages and their default steps: " + ", ".join(STAGES))
    d = " (default: %(default)s)"
    p.add_argument("--workdir", default="output/toy_recipe", help="everything the run writes goes here" + d)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes per training / ODE-data stage (torchrun)" + d)
    p.add_argument("--jobs", type=int, default=1,
                   help="stages (and table rows) run side by side once the stages they read are done; on one GPU "
                        "3-4 cost little more than one, the toy networks being too small to fill it" + d)
    p.add_argument("--quick", action="store_true",
                   help=f"CI size: {QUICK['steps']} steps per stage, {QUICK['n_train']} clips, batch "
                        f"{QUICK['batch_size']}, {QUICK['num_prompts']} prompts; results in <workdir>/toy_results.md")
    p.add_argument("--steps_scale", type=float, default=1.0, help="multiply every stage's max_steps" + d)
    p.add_argument("--steps", nargs="+", default=[], metavar="STAGE=N", help="steps of single stages, e.g. base=500")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every stage, sampling included (e.g. timestep_shift=2); paths and step "
                        "counts are the recipe's own")
    p.add_argument("--stage_override", nargs="+", default=[], metavar="STAGE:KEY=VALUE",
                   help="config overrides for one trained stage, after --override, e.g. dmd_chunkwise:guidance_scale=2 "
                        "(its table rows sample with the stage's config, not with these)")
    p.add_argument("--dit", nargs="+", default=[], metavar="KEY=VALUE",
                   help="edit the DiT config (toy.folders.TOY_DIT) before the random initialisation of the base, e.g. "
                        "num_layers=6 'patch_size=[1,2,2]' (every stage inherits it; needs a fresh --workdir)")
    p.add_argument("--until", default=None, choices=list(STAGES),
                   help="stop training after this stage; only table rows whose models exist are sampled")
    p.add_argument("--only", nargs="+", default=None, metavar="STAGE", choices=list(STAGES),
                   help="train only these stages and score only their rows (A/B runs of one stage); the stages they "
                        "start from need checkpoints/<stage>.pt in --workdir, e.g. links to another run's")
    p.add_argument("--base_weights", default=None, metavar="PATH",
                   help="a trained base (safetensors, Wan folder or checkpoint; e.g. the shipped "
                        "assets/toy/Toy-T2V) becomes checkpoints/base.pt instead of training one: Stages 1-3 alone")
    p.add_argument("--n_train", type=int, default=3072, help="synthetic training clips" + d)
    p.add_argument("--n_heldout", type=int, default=64, help="held-out clips (also the evaluator's real set)" + d)
    p.add_argument("--ode_samples", type=int, default=384,
                   help="ODE trajectories per variant; create_lmdb_iterative keeps one per distinct caption, so at "
                        "most the ~150 training captions become rows" + d)
    p.add_argument("--ode_steps", type=int, default=24,
                   help="Euler steps of the ODE teacher, a multiple of 4 so the student's warped steps lie on the grid "
                        "(the reference: 48)" + d)
    p.add_argument("--ode_guidance", type=float, default=4.0,
                   help="CFG of the ODE teacher; 4.0 = the DMD real score's 3.0 in the 'cond + s (cond - uncond)' "
                        "form" + d)
    p.add_argument("--num_samples", type=int, default=2, help="videos per prompt and table row" + d)
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW", choices=[r.name for r in table_rows()],
                   help="table rows to sample and score (default: all; with --quick: " + " ".join(QUICK_ROWS) + ")")
    p.add_argument("--model_folder", default=str(REPO / "assets" / "toy" / MODEL),
                   help="Wan folder whose text encoder, tokenizer and VAE the run uses (not its DiT: the base starts "
                        "from random weights of toy.folders.TOY_DIT, see --dit)" + d)
    p.add_argument("--prompts", default=str(REPO / "prompts" / "toy_eval.txt"),
                   help="evaluation prompts (the default: 48, every attribute value equally often, 16 of them held-out "
                        "combinations, none used for tuning)" + d)
    p.add_argument("--seed", type=int, default=0, help="data split, initialisation and sampling seed" + d)
    p.add_argument("--results", default=None, help="results markdown (default: <workdir>/toy_results.md; "
                                                   "docs/toy_results.md quotes a full run's)")
    p.add_argument("--ship", action="store_true", help="copy the DMD frame-/chunk-wise generators (bf16 release "
                                                       "format) to assets/toy/checkpoints/<v>/causal_forcing.pt")
    p.add_argument("--ship_base", action="store_true", help="with --ship: also write the trained base DiT (bf16) "
                                                            "and its config.json into assets/toy/Toy-T2V")
    return p


def eval_prompts(recipe: Recipe) -> Path:
    """The evaluation prompt file (with --quick: its first and last prompt, a seen and a held-out one)."""
    lines = [line for line in Path(recipe.args.prompts).read_text().splitlines() if line.strip()]
    if recipe.quick:
        lines = [lines[0], lines[-1]][:QUICK["num_prompts"]]
    path = recipe.work / "eval_prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_needs(name: str) -> set[str]:
    """The stages whose checkpoints ``name`` reads: the one it starts from and, for all but the base, the base
    (Stage 3's real score and critic, the ODE teacher's folder)."""
    init = STAGES[name][1]
    return set() if name == "base" else {"base"} | ({init} if init else set())


def run_tasks(tasks: dict[str, tuple[set[str], Callable[[], None]]], jobs: int = 1) -> None:
    """Run every task ``name -> (the names it waits for, function)`` once, each as soon as the tasks it waits for
    are done, up to ``jobs`` at once; among the ready ones the first in ``tasks`` order goes first (``jobs = 1``: one
    after the other, in order). A task that fails stops the run once the running ones end."""
    pending, done, running = list(tasks), set(), {}
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for name in [n for n in pending if tasks[n][0] <= done][:jobs - len(running)]:
                pending.remove(name)
                running[pool.submit(tasks[name][1])] = name
            if not running:
                raise RuntimeError(f"tasks {pending} wait on tasks that are not scheduled")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()   # re-raises the task's SystemExit
                done.add(name)


def stage_task(recipe: Recipe, name: str) -> Callable[[], None]:
    def one() -> None:
        if name.startswith("ode_") and not recipe.ckpt(name).is_file():   # the trajectories only feed training
            recipe.ode_data(name[len("ode_"):])
        recipe.train(name)
        if name == "base":
            recipe.export_base()
    return one


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.nproc < 1:
        parser.error(f"--jobs and --nproc must be >= 1, got {args.jobs} and {args.nproc}")
    recipe = Recipe(args)
    recipe.work.mkdir(parents=True, exist_ok=True)
    if args.base_weights and not recipe.ckpt("base").is_file():
        recipe.seed_base(Path(args.base_weights))
    order = list(STAGES)   # recipe order: every stage after the one it starts from
    todo = order[:order.index(args.until) + 1] if args.until else order
    wanted = args.rows or (QUICK_ROWS if args.quick else None)
    if args.only:
        if args.until or args.ship:
            parser.error("--only trains single stages: not with --until, and nothing of it is shipped (--ship)")
        todo = [name for name in order if name in args.only]
        missing = sorted({need for name in todo for need in stage_needs(name)} - set(todo)
                         - {name for name in STAGES if recipe.ckpt(name).is_file()})
        if missing:
            parser.error(f"--only {' '.join(todo)} starts from {', '.join(missing)}: no "
                         f"{recipe.ckpt(missing[0]).parent}/<stage>.pt for them; train them first or link another "
                         f"run's checkpoints there")
        wanted = args.rows or [r.name for r in table_rows() if r.stage in todo]
    rows = [r for r in table_rows() if (wanted is None or r.name in wanted)
            and (r.stage in todo or recipe.ckpt(r.stage).is_file())   # only rows whose models exist or are made
            and (not r.use_ema or recipe.keeps_ema(r.stage))]
    recipe.progress = progress = Progress(total=1 + 2 + len(STAGES) + 4 + len(rows), parallel=args.jobs > 1)
    say(f"toy recipe -> {recipe.work} on {recipe.device}; steps: " +
        ", ".join(f"{k} {v}" for k, v in recipe.steps.items()))
    recipe.make_model_folders()
    if "base" not in todo and recipe.ckpt("base").is_file():
        recipe.export_base()   # a base checkpoint from elsewhere (--only): the later stages read its Wan folder
    if any(not recipe.ckpt(name).is_file() for name in todo if not name.startswith("dmd_")):
        recipe.make_data()   # every stage before Stage 3 reads the clean latents (DMD reads prompts only)
    else:
        progress.skip("data", "no stage left that reads it", count=2)
    prompts, scores = eval_prompts(recipe), {}
    # Stages first (the critical path), then each row as soon as its model exists, overlapping later stages.
    tasks = {name: (stage_needs(name) & set(todo), stage_task(recipe, name)) for name in todo}
    if args.ship and not args.until:   # as soon as the shipped models exist: an interrupted run still ships them
        tasks["ship"] = ({"base", "dmd_framewise", "dmd_chunkwise"} & set(todo), recipe.ship)
    for row in rows:
        tasks[f"row {row.name}"] = ({row.stage} & set(todo),
                                    lambda row=row: scores.__setitem__(row.name, recipe.score_row(row, prompts)))
    run_tasks(tasks, args.jobs)
    command = "python -m toy.recipe " + " ".join(argv if argv is not None else sys.argv[1:])
    text = results_markdown(recipe, command, [(row, scores[row.name]) for row in rows],
                            time.perf_counter() - progress.start)
    out = Path(args.results) if args.results else recipe.work / "toy_results.md"
    out.write_text(text)
    say("\n" + text.split("```", 2)[2].strip() + f"\n\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
