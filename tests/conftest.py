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


@pytest.fixture(autouse=True)
def _restore_tf32():
    """A test that runs the training loop on a GPU turns TF32 on process-wide (``Trainer.setup``, as training
    should); float32 tests after it must not inherit it."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture
def single_thread():
    """One intra-op thread for tests on tiny tensors: thread start-up costs more than it saves on a shared machine.
    Modules ask for it with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding configs/, model/, ...)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def configs_dir(repo_root: Path) -> Path:
    """The shipped configs/ folder."""
    return repo_root / "configs"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs mounted at ``tmp_path/disk``, a real filesystem to fill up (ENOSPC, see :func:`fill_disk`).
    Mounting needs root; where it is refused the test is skipped (the simulated failures of the same kind still run)."""
    import subprocess

    point = tmp_path / "disk"
    point.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode(errors='replace').strip()[:80]})")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill_disk(folder: Path, leave: int) -> Path:
    """Fill the filesystem of ``folder`` until ``leave`` bytes are free; returns the filler file (delete it to make
    room again)."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
    return filler


def write_tiny_stream_config(root: Path) -> Path:
    """A tiny Wan folder ``root/Tiny`` and a chunk-wise 4-step generator YAML ``root/tiny.yaml`` over it
    (latents ``[6, 16, 4, 6]``, 32x48 pixels): the world of the streaming and demo tests. Returns the YAML path."""
    from toy.folders import write_tiny_wan_folder

    write_tiny_wan_folder(root / "Tiny")
    yaml = root / "tiny.yaml"
    yaml.write_text(f"""
trainer: score_distillation
wan_models_dir: {root}
generator_name: Tiny
text_encoder_name: Tiny
num_frame_per_block: 3
image_or_video_shape: [1, 6, 16, 4, 6]
num_training_frames: 6
height: 32
width: 48
num_frames: 21
fps: 8
denoising_step_list: [1000, 750, 500, 250]
warp_denoising_step: true
""")
    return yaml
