r"""Train one stage of Causal Forcing.

    torchrun --nproc_per_node=8 train.py --config_path configs/causal_forcing_dmd_chunkwise.yaml \
        --logdir logs/causal_forcing_dmd_chunkwise [--override max_steps=200 lr=1e-6]

A run resumes from the newest checkpoint under ``--logdir`` when there is one (docs/training_loop.md).
"""

import argparse
import dataclasses
import logging
import os
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train one Causal Forcing stage (the YAML's `trainer` picks it).")
    parser.add_argument("--config_path", required=True,
                        help="stage YAML, e.g. configs/ar_diffusion_tf_framewise.yaml")
    parser.add_argument("--logdir", default="",
                        help="output folder: checkpoints/, checkpoint_model_<step>/model.pt, metrics.jsonl; "
                             "a run resumes from the newest checkpoint found here")
    parser.add_argument("--no_save", action="store_true", help="write no checkpoints")
    parser.add_argument("--no_visualize", action="store_true",
                        help="write no sample videos (by default every checkpoint writes short videos of fixed "
                             "prompts to <logdir>/samples/ and to W&B when it is on)")
    parser.add_argument("--disable-wandb", dest="disable_wandb", action="store_true",
                        help="turn Weights & Biases off whatever the config's wandb_mode says")
    parser.add_argument("--wandb-save-dir", dest="wandb_save_dir", default="",
                        help="folder for W&B files (default: the logdir)")
    parser.add_argument("--tf", action="store_true",
                        help="accepted so the published command lines run; it changes nothing, as in the published "
                             "code (which stored it in the config and never read it). Teacher forcing is the "
                             "config's teacher_forcing key")
    parser.add_argument("--offline", action="store_true",
                        help="download nothing (as HF_HUB_OFFLINE=1 does); otherwise missing Wan folders and released "
                             "checkpoints are fetched from the Hugging Face Hub")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config values applied after the YAML, e.g. --override max_steps=500 lr=1e-6")
    return parser.parse_args(argv)


def load_run_config(args: argparse.Namespace):
    """The YAML with ``--override`` applied, plus the runtime keys from the flags."""
    from utils.config import load_config

    cfg = load_config(args.config_path, args.override)
    return dataclasses.replace(cfg, logdir=args.logdir, no_save=args.no_save, disable_wandb=args.disable_wandb,
                               wandb_save_dir=args.wandb_save_dir, no_visualize=args.no_visualize or cfg.no_visualize)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"   # before huggingface_hub is imported: it reads the variable once
    # Imported after parsing so that --help answers without loading torch.
    from trainer.loop import Trainer
    from trainer.registry import build_objective
    from utils.errors import UserError

    try:
        cfg = load_run_config(args)
        Trainer(cfg, build_objective(cfg)).train()
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
