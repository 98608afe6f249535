"""What ``inference.py`` and ``demo.py`` share: the model flags, the config they resolve to, the pipeline they build.

Both entry scripts take the same flags for choosing and loading a generator (config, checkpoint, EMA, attention
window, text-encoder placement, device, overrides, compilation, preview decoder), so those flags, their help texts and
their meaning live here once.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the entry scripts import this module before parsing: keep --help free of torch
    from pipeline.streaming import StreamingPipeline
    from utils.config import Config


def add_model_flags(p: argparse.ArgumentParser, config_required: bool = True, config_help: str = "") -> None:
    """The flags that choose and load a generator, as ``inference.py`` and ``demo.py`` both take them."""
    p.add_argument("--config_path", required=config_required,
                   help=config_help or "stage YAML (merged over configs/default_config.yaml)")
    p.add_argument("--checkpoint_path", help="generator checkpoint (.pt release file, safetensors or Wan folder) or a "
                   "Hub reference such as zhuhz22/Causal-Forcing/chunkwise/causal_forcing.pt (downloaded when "
                   "missing, as are released files and Wan folders); default: the config's generator_ckpt, else "
                   "the model folder's weights")
    p.add_argument("--offline", action="store_true", help="download nothing (as HF_HUB_OFFLINE=1 does): a missing "
                                                          "file stops the run with its hf download command")
    p.add_argument("--use_ema", action="store_true", help="load the checkpoint's generator_ema weights")
    p.add_argument("--local_attn_size", type=int, default=None, help="override the attention window (latent frames)")
    p.add_argument("--sink_size", type=int, default=None, help="override the number of sink frames")
    p.add_argument("--text_encoder_cpu", action="store_true", help="run the text encoder on the CPU "
                   "(saves ~11 GB of GPU memory; by default it runs on the GPU, and where it does not fit beside a "
                   "video its weights stay on the CPU and stream to the GPU layer by layer for each new prompt)")
    p.add_argument("--text_encoder_int8", action="store_true", help="store the text encoder's weights in int8 "
                   "(5.8 GB instead of 11.4: on a 24 GB GPU it then stays resident beside a video; its embeddings "
                   "differ slightly from bf16's: docs/performance.md); the config key text_encoder_int8")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. seed=3")
    p.add_argument("--no_compile", action="store_true", help="GPU: no torch.compile and no CUDA graphs (the fast "
                   "path compiles the DiT's and the VAE decoder's regions once per process, ~30-40 s before the first "
                   "video, and records the DiT's block forwards as CUDA graphs during the first video)")
    p.add_argument("--fp8", action="store_true", help="GPU with fp8 tensor cores (Ada, Hopper, Blackwell): the DiT "
                   "blocks' matrix products in fp8 with row-wise scales (faster, slightly different videos: "
                   "docs/performance.md)")
    p.add_argument("--preview_decoder", default=None, metavar="FILE",
                   help="decode with a tiny TAEHV preview decoder (e.g. taew2_1.pth from "
                        "github.com/madebyollin/taehv) instead of the Wan VAE: much cheaper, lower quality")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of ``--config_path`` with ``--override`` and the window flags applied."""
    from utils.config import load_config

    if args.offline:   # huggingface_hub's own switch, so that transformers and diffusers stay offline too
        os.environ["HF_HUB_OFFLINE"] = "1"
    overrides = list(args.override)
    if args.local_attn_size is not None:
        overrides.append(f"model_kwargs.local_attn_size={args.local_attn_size}")
    if args.sink_size is not None:
        overrides.append(f"model_kwargs.sink_size={args.sink_size}")
    if args.text_encoder_int8:
        overrides.append("text_encoder_int8=true")
    return load_config(args.config_path, overrides)


def pipeline_from_args(args: argparse.Namespace, cfg: Config, device=None) -> StreamingPipeline:
    """The streaming pipeline the model flags describe, on ``device`` (default: cuda if available)."""
    from pipeline.streaming import StreamingPipeline

    return StreamingPipeline.from_config(
        cfg, args.checkpoint_path, args.use_ema, device=device,
        text_encoder_device="cpu" if args.text_encoder_cpu else None, compile=not args.no_compile,
        preview_decoder=args.preview_decoder, fp8=args.fp8)
