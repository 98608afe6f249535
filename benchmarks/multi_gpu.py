"""Multi-GPU validation (issue 10): Stage 1, DMD and inference under torchrun on a random-weights world.

Builds, under ``--workdir``, a Wan model folder with the Wan2.1-T2V-1.3B DiT (random weights, bf16 on disk), a
one-layer UMT5 with d_model 4096 (so ``text_dim`` matches) and the tiny VAE, a latent LMDB of random
``[21, 16, 60, 104]`` latents with prompts, and a prompt file. Then every step runs ``train.py`` / ``inference.py``
as a ``torchrun`` subprocess with the shipped configs and ``--override``, each with its own timeout and log, and the
results JSON is rewritten after every step, so one failure loses nothing else:

  world         the folders above (a subprocess of this script)
  s1_accum      Stage 1 on 1 GPU, batch 1 x 2 micro-batches (total_batch_size 2), --s1-steps + 2 steps
  s1_full       Stage 1 on N GPUs, FSDP2 full sharding, total_batch_size 2, --s1-steps steps, then saves
  export        the release export of s1_full loads strictly through model/loader.py::build_wan_model
  s1_resume     s1_full's checkpoint resumed on 1 GPU for 2 more steps (must equal s1_accum's last 2 steps)
  dmd           DMD (score_distillation) at 1.3B on N GPUs: generator + critic + real score, --dmd-steps steps
  inference     inference.py on N GPUs over the prompt file: every prompt written exactly once (mp4 + latents)
  dmd14b        one DMD step whose real score has the Wan2.1-14B architecture, sharded over N GPUs (the world step
                writes it as a 28 GB bf16 folder with weights drawn on the GPU: WanModel's CPU init takes minutes)
  s1_zero2      Stage 1 on N GPUs with sharding_strategy hybrid_zero2 (on one node hybrid_full == full)
  s1_reverse    (not in the default list) a 1-GPU checkpoint resumed on N GPUs

Losses compare exactly because Stage 1 is world-size invariant (trainer/diffusion.py): the same global batch and
per-sample draws per step on any world size. The budget (``--budget``) caps the whole sequence: a step that cannot get
its minimum time is skipped, and a running one is cut at the budget.

    python benchmarks/multi_gpu.py --out multi_gpu.json                   # 2 GPUs, full size (~8 min on 2x H100)
    python benchmarks/multi_gpu.py --tiny --device cpu --out smoke.json   # CPU smoke test (gloo, tiny models)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent   # the checkout whose train.py / inference.py the steps run
STEPS = ("world", "s1_accum", "s1_full", "export", "s1_resume", "dmd", "inference", "dmd14b", "s1_zero2",
         "s1_reverse")
DEFAULT_STEPS = STEPS[:-1]
# (timeout, minimum time worth starting with) in seconds, per step; cut further by the remaining budget.
TIMEOUTS = {"world": (150, 60), "s1_accum": (200, 60), "s1_full": (180, 80), "export": (90, 30),
            "s1_resume": (150, 60), "dmd": (180, 90), "inference": (150, 60), "s1_zero2": (120, 60),
            "dmd14b": (300, 170), "s1_reverse": (180, 90)}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
S1_CONFIG, DMD_CONFIG = "configs/ar_diffusion_tf_chunkwise.yaml", "configs/causal_forcing_dmd_chunkwise.yaml"
MODEL = "Random-T2V"   # the model folder's name (not a preset name, so a preset such as "tiny" stays a preset)
BIG = "Random-T2V-14B"   # the dmd14b real score's folder: DiT only (config.json + bf16 safetensors)
PROMPTS = ["a red circle moving left slowly", "a green square moving right quickly", "a blue triangle moving up slowly",
           "a yellow circle moving down quickly", "a red square moving up quickly", "a blue circle moving left slowly"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(DEFAULT_STEPS),
                   help="steps to run, in this script's order (default: all but s1_reverse)")
    p.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="steps to leave out of --steps")
    p.add_argument("--gpus", type=int, default=2, help="ranks of the multi-rank runs (GPUs, or CPU processes)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (NCCL, bf16) or cpu (gloo, fp32; subprocesses see no GPU)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny DiT/UMT5/VAE and latents [6, 16, 4, 4] (CPU smoke test); the 14B step's real score is "
                        "a 4-layer DiT of width 128")
    p.add_argument("--workdir", default="/tmp/multi_gpu_bench", help="where the world, logs and runs are written "
                                                                     "(emptied first unless --reuse-world)")
    p.add_argument("--reuse-world", action="store_true", help="keep an existing workdir's world and skip building it")
    p.add_argument("--out", default="multi_gpu.json", help="results JSON (rewritten after every step)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for the whole sequence; steps are skipped or cut to stay inside it")
    p.add_argument("--s1-steps", type=int, default=3, help="Stage-1 steps of the N-GPU runs (1-GPU runs do 2 more)")
    p.add_argument("--dmd-steps", type=int, default=2, help="DMD steps (step 1 = generator + critic, 2 = critic)")
    p.add_argument("--rows", type=int, default=16, help="latent LMDB rows")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts of the inference run (at most 6)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="relative loss tolerance of the comparisons (default 1e-3 on cuda/bf16, 1e-5 on cpu/fp32)")
    # internal: this script as one step's subprocess
    p.add_argument("--task", choices=("world", "big", "export"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# the world (run in a subprocess of this script)


def geometry(args) -> tuple[int, int, int, int]:
    """Latent [F, C, H, W] of the run: Wan's 21 x 16 x 60 x 104, or 6 x 16 x 4 x 4 with --tiny (2 chunks of 3)."""
    return (6, 16, 4, 4) if args.tiny else (21, 16, 60, 104)


def random_dit_state_dict(config, device: str, seed: int = 0) -> dict:
    """Random bf16 DiT weights (CPU tensors) drawn on ``device``, Wan's init scales: weights N(0, 0.02),
    modulations N(0, 1/dim), norm weights 1, biases 0.

    Drawn on the GPU because WanModel's own CPU initialisation takes minutes at 14B (one CPU RNG stream)."""
    import torch

    from model.wan import WanModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(config).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            value = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        else:
            std = config.dim ** -0.5 if "modulation" in name else 0.02
            value = torch.randn(shape, generator=gen, device=device) * std
        out[name] = value.to(torch.bfloat16).cpu()
    return out


def build_world(args, work: Path) -> dict:
    import numpy as np
    import torch

    from model.config import get_preset
    from toy.folders import DEFAULT_SENTENCES, TINY_DIT, write_tiny_wan_folder
    from utils.lmdb_store import LMDBWriter

    t0 = time.perf_counter()
    device = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    dit = TINY_DIT if args.tiny else get_preset("wan2.1-t2v-1.3b")
    # A one-layer UMT5 whose d_model is the DiT's text_dim (write_tiny_wan_folder sets it), tiny VAE (default).
    folder = write_tiny_wan_folder(work / "models" / MODEL, dit=dit, t5=dict(num_layers=1),
                                   sentences=DEFAULT_SENTENCES + PROMPTS, weights_dtype=torch.bfloat16,
                                   dit_state_dict=random_dit_state_dict(dit, device))
    t_model = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    shape = geometry(args)
    with LMDBWriter(work / "latents") as writer:   # clean rows [1, F, C, H, W], one at a time
        for i in range(args.rows):
            latent = rng.standard_normal((1, 1, *shape), dtype=np.float32)
            writer.append(latent, [PROMPTS[i % len(PROMPTS)] + f", take {i}"])
    (work / "prompts.txt").write_text("\n".join(PROMPTS[: args.num_prompts]) + "\n")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"dit_params": sum(p.numel() for p in _dit_shapes(dit)), "folder_gb": size / 1e9,
            "model_folder_s": t_model, "total_s": time.perf_counter() - t0, "latent_shape": list(shape),
            "rows": args.rows, "device": device, "disk_free_gb": shutil.disk_usage(work).free / 1e9}


def build_big(args, work: Path) -> dict:
    """The dmd14b real score's folder: the Wan2.1-14B architecture (a 4-layer width-128 DiT with --tiny), random
    bf16 weights drawn on the GPU, config.json + one safetensors file (28 GB at 14B)."""
    import torch
    from safetensors.torch import save_file

    from model.config import WanConfig, get_preset
    from toy.folders import TINY_DIT

    t0 = time.perf_counter()
    device = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    big = WanConfig(dim=128, ffn_dim=256, freq_dim=32, text_dim=TINY_DIT.text_dim, num_heads=4, num_layers=4,
                    text_len=TINY_DIT.text_len) if args.tiny else get_preset("wan2.1-t2v-14b")
    folder = work / "models" / (BIG + ".tmp")
    folder.mkdir(parents=True, exist_ok=True)
    big.to_json(str(folder / "config.json"))
    save_file(random_dit_state_dict(big, device, seed=1), str(folder / "diffusion_pytorch_model.safetensors"))
    os.replace(folder, work / "models" / BIG)   # complete or absent
    size = (work / "models" / BIG / "diffusion_pytorch_model.safetensors").stat().st_size
    return {"params": sum(p.numel() for p in _dit_shapes(big)), "gb": size / 1e9, "seconds": time.perf_counter() - t0}


def _dit_shapes(config):
    import torch

    from model.wan import WanModel
    with torch.device("meta"):
        return list(WanModel(config).parameters())


def check_export(args, work: Path) -> dict:
    """The s1_full release export loads strictly into the causal generator; it holds trained (changed) weights."""
    import torch

    from model.loader import build_wan_model, read_state_dict

    path = work / "runs" / "s1_full" / f"checkpoint_model_{args.s1_steps:06d}" / "model.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    keys = sorted(payload)
    prefixed = all(k.startswith("model.") for k in payload["generator"])
    folder = work / "models" / MODEL
    model = build_wan_model(str(folder), causal=True, num_frame_per_block=3, checkpoint_path=str(path))
    initial = read_state_dict(str(folder))
    trained = model.state_dict()
    changed = sum(not torch.equal(trained[k], initial[k].float()) for k in initial)
    finite = all(torch.isfinite(v).all().item() for v in trained.values())
    return {"path": str(path), "entries": keys, "model_prefix": prefixed, "tensors": len(trained),
            "params": sum(v.numel() for v in trained.values()), "changed_vs_initial": changed, "finite": finite,
            "ok": prefixed and finite and changed > 0 and "generator" in keys}


# ---------------------------------------------------------------------------------------------------------------------
# subprocess runner


class Bench:
    """Runs the steps, each with a timeout inside the overall budget, and rewrites the results after every step."""

    def __init__(self, args):
        self.args, self.work = args, Path(args.workdir).resolve()
        self.start = time.perf_counter()
        self.results: dict = {"args": {k: v for k, v in vars(args).items() if k != "task"}, "steps": {},
                              "comparisons": {}}
        self.tol = args.tolerance or (1e-3 if args.device == "cuda" else 1e-5)

    def remaining(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def save(self) -> None:
        from utils.io import AtomicPath

        self.results["elapsed_s"] = time.perf_counter() - self.start
        with AtomicPath(self.args.out) as tmp:
            tmp.write_text(json.dumps(self.results, indent=1, default=str))

    def env(self, nproc: int) -> dict:
        env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
        if self.args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif nproc == 1:
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        return env

    def call(self, name: str, cmd: list[str], nproc: int, timeout: float) -> dict:
        """Run ``cmd`` in its own process group with a timeout; its output goes to ``logs/<name>.log``."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(nproc), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = "timeout"
        text = log.read_text(errors="replace")
        return {"rc": rc, "wall_s": time.perf_counter() - t0, "log": str(log), "tail": text[-1500:] if rc else ""}

    def torchrun(self, name: str, nproc: int, script: str, script_args: list[str], timeout: float) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
               *script_args]
        return self.call(name, cmd, nproc, timeout)

    def run_step(self, name: str, fn) -> None:
        timeout, minimum = TIMEOUTS[name]
        left = self.remaining()
        if left < minimum:
            self.results["steps"][name] = {"status": "skipped", "reason": f"{left:.0f} s of budget left, needs "
                                                                          f"{minimum} s"}
        else:
            print(f"[{time.perf_counter() - self.start:6.0f}s] {name} (timeout {min(timeout, left):.0f} s)",
                  flush=True)
            try:
                out = fn(min(timeout, left))
            except Exception as err:  # one failed step must not lose the others
                out = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            out.setdefault("status", "ok" if out.get("rc") == 0 else ("timeout" if out.get("rc") == "timeout"
                                                                        else "failed"))
            self.results["steps"][name] = out
            print(f"         -> {out['status']}" + (f" ({out.get('wall_s', 0):.0f} s)" if "wall_s" in out else ""),
                  flush=True)
            if out["status"] != "ok" and out.get("tail"):
                print(out["tail"][-800:], flush=True)
        self.save()


# ---------------------------------------------------------------------------------------------------------------------
# the steps


def common_overrides(b: Bench) -> list[str]:
    f, c, h, w = geometry(b.args)
    out = [f"wan_models_dir={b.work / 'models'}", f"generator_name={MODEL}", f"text_encoder_name={MODEL}",
           f"real_name={MODEL}", f"fake_name={MODEL}", f"image_or_video_shape=[1,{f},{c},{h},{w}]",
           f"num_training_frames={f}", "seed=0", "log_every=1", "log_iters=100000", "wandb_mode=disabled"]
    if b.args.device == "cpu":
        out.append("mixed_precision=false")
    return out


def read_metrics(logdir: Path, after_step: int = 0) -> list[dict]:
    path = logdir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] > after_step]


def summarize(rows: list[dict], loss_key: str, samples_per_step: int) -> dict:
    """Losses per step, steady step time (steps after the first), samples/s and the peak memory per GPU."""
    times = [r["step_time"] for r in rows[1:]] or [r["step_time"] for r in rows]
    step_time = statistics.median(times) if times else None
    peaks = [r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r]
    return {"losses": {r["step"]: r.get(loss_key) for r in rows}, "step_time_s": step_time,
            "steps_per_s": 1 / step_time if step_time else None,
            "samples_per_s": samples_per_step / step_time if step_time else None,
            "peak_memory_gib_per_gpu": max(peaks) if peaks else None,
            "metrics": rows}


def stage1(b: Bench, name: str, nproc: int, steps: int, strategy: str = "full", logdir: Path | None = None,
           save: bool = False, timeout: float = 60) -> dict:
    logdir = logdir or b.work / "runs" / name
    before = max((r["step"] for r in read_metrics(logdir)), default=0)
    args = ["--config_path", S1_CONFIG, "--logdir", str(logdir), "--no_visualize", "--disable-wandb",
            *([] if save else ["--no_save"]), "--override", *common_overrides(b), f"data_path={b.work / 'latents'}",
            "batch_size=1", "total_batch_size=2", f"max_steps={steps}", f"sharding_strategy={strategy}",
            "caption_dropout=0.1"]
    out = b.torchrun(name, nproc, "train.py", args, timeout)
    out.update(nproc=nproc, strategy=strategy, **summarize(read_metrics(logdir, before), "generator_loss", 2))
    return out


def compare(b: Bench, name: str, a: str, other: str, steps: list[int]) -> None:
    """Max relative difference of the per-step losses of two runs over ``steps``."""
    la = b.results["steps"].get(a, {}).get("losses", {})
    lb = b.results["steps"].get(other, {}).get("losses", {})
    pairs = [(la.get(s), lb.get(s)) for s in steps]
    if not steps or any(x is None or y is None for x, y in pairs):
        b.results["comparisons"][name] = {"status": "missing", "steps": steps}
        return
    diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)
    b.results["comparisons"][name] = {"status": "agree" if diff <= b.tol else "DIFFER", "max_rel_diff": diff,
                                      "tolerance": b.tol, "steps": steps}


def step_world(b: Bench, timeout: float) -> dict:
    if b.args.reuse_world and (b.work / "latents").is_dir():
        return {"status": "ok", "reused": True}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--task", "world", "--workdir", str(b.work),
           "--out", str(b.work / "world.json"), "--rows", str(b.args.rows), "--num-prompts", str(b.args.num_prompts),
           "--device", b.args.device, "--steps", *b.args.steps, *(["--skip", *b.args.skip] if b.args.skip else []),
           *(["--tiny"] if b.args.tiny else [])]
    out = b.call("world", cmd, 1, timeout)
    if out["rc"] == 0:
        out.update(json.loads((b.work / "world.json").read_text()))
    return out


def step_export(b: Bench, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--task", "export", "--workdir", str(b.work),
           "--out", str(b.work / "export.json"), "--s1-steps", str(b.args.s1_steps)]
    out = b.call("export", cmd, 1, timeout)
    if out["rc"] == 0:
        out.update(json.loads((b.work / "export.json").read_text()))
        out["status"] = "ok" if out["ok"] else "failed"
    return out


def export_path(b: Bench) -> Path:
    return b.work / "runs" / "s1_full" / f"checkpoint_model_{b.args.s1_steps:06d}" / "model.pt"


def step_dmd(b: Bench, name: str, timeout: float, real: str | None = None, steps: int | None = None) -> dict:
    logdir = b.work / "runs" / name
    ckpt = export_path(b)
    args = ["--config_path", DMD_CONFIG, "--logdir", str(logdir), "--no_visualize", "--disable-wandb", "--no_save",
            "--override", *common_overrides(b), f"data_path={b.work / 'prompts.txt'}",
            f"generator_ckpt={ckpt if ckpt.is_file() else 'null'}", f"max_steps={steps or b.args.dmd_steps}",
            "sharding_strategy=full", "batch_size=1"]
    if real:
        args.append(f"real_name={real}")
    out = b.torchrun(name, b.args.gpus, "train.py", args, timeout)
    out.update(nproc=b.args.gpus, generator_ckpt=str(ckpt) if ckpt.is_file() else None, real_score=real or MODEL,
               **summarize(read_metrics(logdir), "generator_loss", b.args.gpus))
    rows = out["metrics"]
    out["critic_losses"] = {r["step"]: r.get("critic_loss") for r in rows}
    # Step 1 runs the generator and the critic, later steps the critic only: report both step times.
    out["step_time_by_step"] = {r["step"]: r["step_time"] for r in rows}
    return out


def mp4_writer() -> str | None:
    """Why utils/video.py cannot write mp4 here, with what a device call must carry for it, or None."""
    from utils.video import mp4_writer_missing

    if missing := mp4_writer_missing():
        return f"{missing}; carry build/mp4-wheels (imageio_ffmpeg wheel with its ffmpeg binary)"
    return None


def step_inference(b: Bench, timeout: float) -> dict:
    reason = mp4_writer()
    if reason:
        return {"status": "skipped", "reason": reason}
    from utils.video import safe_output_name

    folder = b.work / "runs" / "inference"
    shutil.rmtree(folder, ignore_errors=True)
    ckpt = export_path(b)
    args = ["--config_path", DMD_CONFIG, "--data_path", str(b.work / "prompts.txt"), "--output_folder", str(folder),
            "--save_latents", "--no_compile", *(["--checkpoint_path", str(ckpt)] if ckpt.is_file() else []),
            "--override", *common_overrides(b)]
    out = b.torchrun("inference", b.args.gpus, "inference.py", args, timeout)
    prompts = [p for p in (b.work / "prompts.txt").read_text().splitlines() if p.strip()]
    used: set = set()
    expected = {safe_output_name(p, used=used) for p in prompts}
    mp4s = {p.stem for p in folder.glob("*.mp4")}
    latents = {p.name[: -len(".latents.pt")] for p in folder.glob("*.latents.pt")}
    log = Path(out["log"]).read_text(errors="replace")
    written = [int(line.split()[0]) for line in log.splitlines() if line.split()[1:3] == ["videos", "written,"]]
    frames = None
    if mp4s:
        from utils.video import read_mp4
        frames = list(read_mp4(folder / f"{sorted(mp4s)[0]}.mp4").shape)
    ok = out["rc"] == 0 and mp4s == expected == latents and sum(written) == len(prompts)
    out.update(status="ok" if ok else ("timeout" if out["rc"] == "timeout" else "failed"), prompts=len(prompts),
               mp4=len(mp4s), latents=len(latents), written_per_rank=written, missing=sorted(expected - mp4s),
               first_video_shape=frames, checkpoint=str(ckpt) if ckpt.is_file() else None)
    return out


def run_all(args) -> dict:
    b = Bench(args)
    if not args.reuse_world:
        shutil.rmtree(b.work, ignore_errors=True)
    b.work.mkdir(parents=True, exist_ok=True)
    n, s = args.gpus, args.s1_steps
    runs = {
        "world": lambda t: step_world(b, t),
        "s1_accum": lambda t: stage1(b, "s1_accum", 1, s + 2, timeout=t),
        "s1_full": lambda t: stage1(b, "s1_full", n, s, save=True, timeout=t),
        "export": lambda t: step_export(b, t),
        "s1_resume": lambda t: step_s1_resume(b, t),
        "dmd": lambda t: step_dmd(b, "dmd", t),
        "inference": lambda t: step_inference(b, t),
        "s1_zero2": lambda t: stage1(b, "s1_zero2", n, s, strategy="hybrid_zero2", timeout=t),
        "dmd14b": lambda t: step_dmd14b(b, t),
        "s1_reverse": lambda t: s1_reverse(b, t),
    }
    for name in STEPS:
        if name in args.steps and name not in args.skip:
            b.run_step(name, runs[name])
    compare(b, "s1_full(N GPUs) vs s1_accum(1 GPU)", "s1_full", "s1_accum", list(range(1, s + 1)))
    compare(b, "s1_resume(N->1 GPU) vs s1_accum", "s1_resume", "s1_accum", [s + 1, s + 2])
    compare(b, "s1_zero2 vs s1_accum", "s1_zero2", "s1_accum", list(range(1, s + 1)))
    compare(b, "s1_reverse(1->N GPUs) vs s1_accum", "s1_reverse", "s1_accum", [s + 1, s + 2])
    b.save()
    print_summary(b)
    return b.results


def step_dmd14b(b: Bench, timeout: float) -> dict:
    """Write the 14B-architecture folder (if the disk has room), then one DMD step with it as the real score."""
    free_gb = shutil.disk_usage(b.work).free / 1e9
    if not b.args.tiny and free_gb < 40:
        return {"status": "skipped", "reason": f"{free_gb:.0f} GB free in {b.work}; the 14B folder needs 28 GB"}
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--task", "big", "--workdir", str(b.work),
           "--out", str(b.work / "big.json"), "--device", b.args.device, *(["--tiny"] if b.args.tiny else [])]
    made = b.call("dmd14b_folder", cmd, 1, timeout * 0.45)
    if made["rc"] != 0:
        return {**made, "status": "failed", "stage": "writing the 14B folder"}
    out = step_dmd(b, "dmd14b", timeout - (time.perf_counter() - t0), real=BIG, steps=1)
    out["folder"] = {**json.loads((b.work / "big.json").read_text()), "wall_s": made["wall_s"]}
    return out


def step_s1_resume(b: Bench, timeout: float) -> dict:
    """s1_full's step-s checkpoint (N ranks) resumed on 1 GPU for 2 more steps, without saving."""
    logdir, s = b.work / "runs" / "s1_full", b.args.s1_steps
    if not (logdir / "checkpoints" / f"step_{s:06d}").is_dir():
        return {"status": "skipped", "reason": f"s1_full left no checkpoint step_{s:06d}"}
    return stage1(b, "s1_resume", 1, s + 2, logdir=logdir, timeout=timeout)


def s1_reverse(b: Bench, timeout: float) -> dict:
    """A 1-GPU run saved at step s, resumed on N GPUs for 2 more steps."""
    logdir = b.work / "runs" / "s1_reverse"
    first = stage1(b, "s1_reverse_1gpu", 1, b.args.s1_steps, logdir=logdir, save=True, timeout=timeout / 2)
    if first["rc"] != 0:
        return first
    return stage1(b, "s1_reverse", b.args.gpus, b.args.s1_steps + 2, logdir=logdir, timeout=timeout / 2)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _fmt(value, spec: str) -> str:
    return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)


def print_summary(b: Bench) -> None:
    print(f"\nmulti-GPU validation ({b.args.device}, {b.args.gpus} ranks, {'tiny' if b.args.tiny else '1.3B'}), "
          f"{b.results['elapsed_s']:.0f} s")
    print(f"{'step':<11} {'status':<8} {'wall s':>7} {'step s':>7} {'steps/s':>8} {'samp/s':>7} {'peak GiB':>8}  note")
    for name, r in b.results["steps"].items():
        note = r.get("reason") or r.get("error") or ""
        if name == "export" and "params" in r:
            note = f"{_count(r['params'])} params, {r['changed_vs_initial']}/{r['tensors']} tensors changed"
        if name.startswith("s1_") and r.get("losses"):
            note = "losses " + " ".join(f"{k}:{v:.5g}" for k, v in r["losses"].items())
        if name == "inference" and "prompts" in r:
            note = f"{r['mp4']}/{r['prompts']} mp4, {r['latents']} latents, per rank {r['written_per_rank']}"
        if name.startswith("dmd") and r.get("step_time_by_step"):
            note = "step time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["step_time_by_step"].items()) + \
                " (1: generator + critic, then critic only)"
            if "folder" in r:
                f = r["folder"]
                note += f"; real score {_count(f['params'])}, folder written in {f['wall_s']:.0f}s"
        if name == "world" and "folder_gb" in r:
            note = f"{_count(r['dit_params'])} DiT, folder {r['folder_gb']:.2f} GB" + (
                f", {r['disk_free_gb']:.0f} GB disk free" if "disk_free_gb" in r else "")
        print(f"{name:<11} {r['status']:<8} {_fmt(r.get('wall_s'), '7.0f')} {_fmt(r.get('step_time_s'), '7.2f')} "
              f"{_fmt(r.get('steps_per_s'), '8.3f')} {_fmt(r.get('samples_per_s'), '7.2f')} "
              f"{_fmt(r.get('peak_memory_gib_per_gpu'), '8.1f')}  {note[:120]}")
    for name, c in b.results["comparisons"].items():
        if c["status"] != "missing":
            print(f"{name}: {c['status']} (max rel diff {c['max_rel_diff']:.2e}, tol {c['tolerance']:.0e}, "
                  f"steps {c['steps']})")
    print(f"wrote {b.args.out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.task:   # a step's own subprocess
        work = Path(args.workdir)
        result = {"world": build_world, "big": build_big, "export": check_export}[args.task](args, work)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return 0
    results = run_all(args)
    bad = [n for n, r in results["steps"].items() if r["status"] not in ("ok", "skipped")]
    bad += [n for n, c in results["comparisons"].items() if c["status"] == "DIFFER"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
