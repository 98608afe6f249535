"""Test-wide setup: offline, no W&B traffic, files kept in a temporary folder, seeded RNGs, and a few path fixtures.

The environment variables are set at import time, before any test module imports huggingface_hub, transformers or
wandb, because those libraries read them when they are first imported.
"""

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

_SCRATCH = tempfile.mkdtemp(prefix="causal-forcing-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: tests build tiny models themselves
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("WANDB_API_KEY", None)  # a developer's key must never reach a test run
for _name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    # wandb writes debug logs under its cache dir even when WANDB_DIR is set (libraries.md §6)
    os.environ[_name] = os.path.join(_SCRATCH, _name.lower())

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so results do not depend on test order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding configs/, model/, ...)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def configs_dir(repo_root: Path) -> Path:
    """The shipped configs/ folder."""
    return repo_root / "configs"
