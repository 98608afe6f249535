"""Time one Stage-3 (DMD) generator step and one critic step on one device; report peak memory.

Full size by default: Wan2.1-1.3B-sized generator, critic and real score with RANDOM weights (preset names, no
download) and random text embeddings ``[1, text_len, text_dim]`` (the text encoder is skipped). Each step is what the
training loop does per phase: zero grads, loss (rollout + score networks), backward, clip, AdamW.

    python benchmarks/bench_dmd_step.py --frames 21 --height 60 --width 104 --chunk 3 --out dmd_step.json
    python benchmarks/bench_dmd_step.py --tiny          # CPU smoke test (tiny preset, a few frames)

Mixed precision: ``--wrap fsdp`` (default) shards every network with FSDP2 over a one-rank group -- fp32 master
weights, bf16 compute, exactly the training loop's path; ``--wrap none`` keeps plain fp32 modules under
``torch.autocast(bf16)``. The real score is stored in bf16 either way. Exit steps are forced to the last step
(the most expensive rollout) unless ``--random-exit``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import common  # noqa: F401  (this checkout's packages first on sys.path)
import torch

from model.config import get_preset
from trainer.dmd import DMDObjective
from utils.config import load_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "causal_forcing_dmd_framewise.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny preset and sizes (CPU smoke test)")
    p.add_argument("--frames", type=int, default=None, help="latent frames of the rollout (default 21; tiny 6)")
    p.add_argument("--height", type=int, default=None, help="latent height (default 60; tiny 4)")
    p.add_argument("--width", type=int, default=None, help="latent width (default 104; tiny 4)")
    p.add_argument("--chunk", type=int, default=3, help="latent frames per block (1 frame-wise, 3 chunk-wise)")
    p.add_argument("--steps", type=int, default=2, help="generator+critic steps; the first is reported as warm-up")
    p.add_argument("--model", default=None, help="generator/critic preset (default wan2.1-t2v-1.3b; tiny 'tiny')")
    p.add_argument("--real", default=None, help="real-score preset (default = --model; e.g. wan2.1-t2v-14b)")
    p.add_argument("--real-offload", action="store_true",
                   help="keep the real score on the CPU (FSDP CPU offload, or moved per use with --wrap none)")
    p.add_argument("--wrap", choices=("fsdp", "none"), default="fsdp", help="mixed precision through FSDP2 or autocast")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="compute dtype (default bf16 on CUDA, fp32 on CPU; bf16 on CPU tests the mixed paths)")
    p.add_argument("--random-exit", action="store_true", help="draw exit steps instead of always the last step")
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--out", default="bench_dmd_step.json", help="JSON results file")
    return p.parse_args(argv)


def build_config(args, models_dir: str):
    model = args.model or ("tiny" if args.tiny else "wan2.1-t2v-1.3b")
    real = args.real or model
    frames = args.frames or (6 if args.tiny else 21)
    height = args.height or (4 if args.tiny else 60)
    width = args.width or (4 if args.tiny else 104)
    mixed = args.dtype == "bf16" or (args.dtype is None and torch.cuda.is_available())
    channels = get_preset(model).in_dim
    overrides = [
        f"wan_models_dir={models_dir}", f"generator_name={model}", f"fake_name={model}", f"real_name={real}",
        "generator_ckpt=null", f"num_frame_per_block={args.chunk}",
        f"image_or_video_shape=[1,{frames},{channels},{height},{width}]",
        f"num_training_frames={frames}", f"mixed_precision={str(mixed).lower()}",
        f"last_step_only={str(not args.random_exit).lower()}",
        f"gradient_checkpointing={str(not args.no_checkpointing).lower()}", f"seed={args.seed}",
        f"real_score_cpu_offload={str(args.real_offload).lower()}"]
    return load_config(CONFIG, overrides), model


def wrap(obj: DMDObjective, networks, mode: str) -> str:
    """FSDP2 over a one-rank group (fp32 masters, bf16 compute: the loop's path). Returns how the generator was wrapped.

    Critic and real score: per block, then the root (utils.distributed). The generator: one unit at the root, as the
    reference's FSDP1 size policy leaves Wan-1.3B (blocks of ~46M stay unwrapped). ``forward_cached`` is registered
    so FSDP gathers the root for it.
    """
    if mode != "fsdp":
        # Under autocast fp32 norm weights promote q/k to fp32, which flash-attn rejects; SDPA casts by itself.
        from model.attention import set_backend
        set_backend("sdpa")
        return "none"
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from utils.distributed import apply_fsdp, build_mesh, init_distributed, shard_frozen

    init_distributed()
    mixed = obj.cfg.mixed_precision
    apply_fsdp(networks.trainable["critic"], "full", mixed)
    offload = obj.cpu_offload["real_score"] and obj.device.type == "cuda"   # FSDP offload needs an accelerator
    shard_frozen(networks.frozen["real_score"], "full", mixed, cpu_offload=offload)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed \
        else MixedPrecisionPolicy()
    generator = networks.trainable["generator"]
    fully_shard(generator, mesh=build_mesh("full"), mp_policy=policy)
    register_fsdp_forward_method(generator, "forward_cached")
    return "fsdp-root"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_phase(obj, phase, batch, opt, max_norm, device, autocast) -> dict:
    """One optimizer step of ``phase``; times of loss / backward / clip+step and the phase's peak memory."""
    net = obj.networks.trainable[phase]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss, metrics = obj.loss(phase, batch, step=0)
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    opt.step()
    sync(device)
    t3 = time.perf_counter()
    out = {"loss_s": t1 - t0, "backward_s": t2 - t1, "clip_step_s": t3 - t2, "total_s": t3 - t0,
           "loss": loss.item(), "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
           "exit_step": float(metrics["exit_step"])}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as empty:   # no model folders: presets with random weights
        cfg, model = build_config(args, empty)
        obj = DMDObjective(cfg, text_encoder=False)
        t_build = time.perf_counter()
        networks = obj.build_networks(device)
    with torch.no_grad():   # Wan zero-inits its head: random models would give G = 0 and zero gradients
        for net in (*networks.trainable.values(), networks.frozen["real_score"]):
            net.head.head.weight.normal_(std=0.02)
    if cfg.mixed_precision and device.type == "cpu":   # the objective picks bf16 only on CUDA; force it here
        obj.compute_dtype = torch.bfloat16
        networks.frozen["real_score"].to(torch.bfloat16)
    if cfg.gradient_checkpointing:   # the loop's one switch, applied from outside before any sharding
        from utils.distributed import apply_activation_checkpointing
        for net in networks.trainable.values():
            apply_activation_checkpointing(net)
    generator_wrap = wrap(obj, networks, args.wrap)
    obj.attach(networks)
    sync(device)
    t_build = time.perf_counter() - t_build
    arch = get_preset(model)
    dtype = obj.compute_dtype
    embeds = torch.randn(cfg.batch_size, arch.text_len, arch.text_dim, device=device, dtype=dtype)
    obj.negative_embeds = torch.randn(1, arch.text_len, arch.text_dim, device=device, dtype=dtype)
    opts = {p.name: torch.optim.AdamW(networks.trainable[p.name].parameters(), lr=p.lr, betas=p.betas,
                                      weight_decay=cfg.weight_decay) for p in obj.phases()}
    norms = {p.name: p.max_grad_norm for p in obj.phases()}
    use_autocast = args.wrap == "none" and dtype != torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if use_autocast else contextlib.nullcontext
    if device.type == "cuda":
        resident_gib = torch.cuda.memory_allocated(device) / 2**30
    steps = []
    for _ in range(args.steps):
        batch = {"prompt_embeds": embeds}
        steps.append({phase: run_phase(obj, phase, batch, opts[phase], norms[phase], device, autocast)
                      for phase in ("generator", "critic")})
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": model, "real": cfg.real_name, "wrap": args.wrap,
        "generator_wrap": generator_wrap,
        "dtype": str(dtype).replace("torch.", ""), "frames": cfg.num_training_frames,
        "latent": cfg.image_or_video_shape[2:], "chunk": cfg.num_frame_per_block,
        "denoising_steps": obj.schedule.timesteps, "last_step_only": cfg.last_step_only,
        "gradient_checkpointing": cfg.gradient_checkpointing, "build_s": t_build,
        "warmup": steps[0], "steps": steps[1:] or steps,
    }
    if device.type == "cuda":
        result["resident_gib_before_steps"] = resident_gib
        result["peak_gib"] = max(r["peak_gib"] for s in steps for r in s.values())
    for i, s in enumerate(steps):
        tag = "warm-up" if i == 0 and len(steps) > 1 else f"step {i}"
        line = "  ".join(f"{ph}: {r['total_s']:.3f}s (loss {r['loss_s']:.3f} bwd {r['backward_s']:.3f} "
                         f"opt {r['clip_step_s']:.3f}"
                         + (f", peak {r['peak_gib']:.1f} GiB)" if "peak_gib" in r else ")") for ph, r in s.items())
        print(f"{tag}: {line}")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
