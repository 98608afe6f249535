"""Every command of the published README (thu-ml/Causal-Forcing), run as written against a tiny world built here.

The world is a folder laid out as the README expects (``wan_models/``, ``checkpoints/``, ``dataset/``, ``prompts/``,
``configs/``) and each command runs with it as the working directory, its argument list untouched, through the
script file itself (``runpy``, as ``python <script>`` would). What differs from a real run, and why:

* the world's ``configs/<name>.yaml`` are the shipped files (``base:``) shrunk to 6 latent frames of 4x6, 32x48
  pixels and one training step, so a CPU runs everything in minutes; the Wan folders are tiny random ones and the
  released checkpoints tiny random weights in the published layouts (entries and key prefixes);
* launchers are dropped: ``torchrun ... train.py ARGS`` runs ``train.py ARGS`` as one rank (the same code);
* ``hf download`` lines are replaced by the files they fetch; install lines are not run;
* the README's KV ODE-data command is run as intended: as printed, its ``3/1`` is a placeholder and the comment after
  it ends the shell continuation, so ``--generation_mode`` would become a command of its own;
* its "inference to test training results" template ``{framewise OR chunkwise}`` is written out both ways.
"""

import logging
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from app.jobs import read_image_prompts
from model.loader import read_state_dict
from toy.folders import DEFAULT_SENTENCES, write_tiny_wan_folder
from utils.create_lmdb_iterative import create_ode_lmdb
from utils.datasets import LatentLMDBDataset, ODERegressionLMDBDataset
from utils.video import safe_output_name

REPO = Path(__file__).resolve().parent.parent
FRAMES, LATENT = 6, (16, 4, 6)
CONFIGS = ["ar_diffusion_tf_framewise", "ar_diffusion_tf_chunkwise", "causal_ode_framewise", "causal_ode_chunkwise",
           "causal_cd_framewise", "causal_cd_chunkwise", "causal_forcing_dmd_framewise",
           "causal_forcing_dmd_chunkwise", "causal_forcing_dmd_framewise_1step", "causal_forcing_dmd_framewise_2step"]
TINY = f"""image_or_video_shape: [1, {FRAMES}, {', '.join(map(str, LATENT))}]
num_training_frames: {FRAMES}
height: 32
width: 48
max_steps: 1
log_iters: 1
mixed_precision: false
gradient_checkpointing: false
"""
# checkpoint file -> its entries, as the published trainers wrote them (None: the plain "model." prefix)
RELEASED = {
    "framewise/ar_diffusion.pt": ("generator",), "chunkwise/ar_diffusion.pt": ("generator",),
    "framewise/causal_ode.pt": ("generator",), "chunkwise/causal_ode.pt": ("generator",),
    "framewise/causal_cd.pt": ("generator_ema",), "chunkwise/causal_cd.pt": ("generator_ema",),
    "framewise/causal_forcing.pt": ("generator", "generator_ema"),
    "chunkwise/causal_forcing.pt": ("generator", "generator_ema"),
    "causal-forcing++/framewise-2step.pt": ("generator_ema",),
    "causal-forcing++/framewise-1step.pt": ("generator_ema",),
    "chunkwise/longvideo.pt": ("generator", "generator_ema"),
}

INFERENCE = {   # the README's "CLI Inference" and "inference to test training results"
    "chunkwise": """python inference.py \\
  --config_path configs/causal_forcing_dmd_chunkwise.yaml \\
  --output_folder output/chunkwise \\
  --checkpoint_path checkpoints/chunkwise/causal_forcing.pt \\
  --data_path prompts/demos.txt""",
    "framewise_2step": """python inference.py \\
  --config_path configs/causal_forcing_dmd_framewise_2step.yaml \\
  --output_folder output/framewise_2step_cf++ \\
  --checkpoint_path checkpoints/causal-forcing++/framewise-2step.pt \\
  --data_path prompts/demos.txt \\
  --use_ema""",
    "framewise_1step": """python inference.py \\
  --config_path configs/causal_forcing_dmd_framewise_1step.yaml \\
  --output_folder output/framewise_1step_cf++ \\
  --checkpoint_path checkpoints/causal-forcing++/framewise-1step.pt \\
  --data_path prompts/demos.txt \\
  --use_ema""",
    "framewise": """python inference.py \\
  --config_path configs/causal_forcing_dmd_framewise.yaml \\
  --output_folder output/framewise \\
  --checkpoint_path  checkpoints/framewise/causal_forcing.pt \\
  --data_path prompts/demos.txt \\
  --use_ema """,
    "i2v": """python inference.py \\
  --config_path configs/causal_forcing_dmd_framewise.yaml \\
  --output_folder output/framewise \\
  --checkpoint_path  checkpoints/framewise/causal_forcing.pt \\
  --data_path prompts/i2v \\
  --i2v \\
  --use_ema""",
    "stage1_framewise": """python inference.py \\
  --config_path configs/ar_diffusion_tf_framewise.yaml \\
  --output_folder output/framewise_ar_diffusion \\
  --checkpoint_path  checkpoints/framewise/ar_diffusion.pt \\
  --data_path prompts/demos.txt""",
    "stage1_chunkwise": """python inference.py \\
  --config_path configs/ar_diffusion_tf_chunkwise.yaml \\
  --output_folder output/chunkwise_ar_diffusion \\
  --checkpoint_path  checkpoints/chunkwise/ar_diffusion.pt \\
  --data_path prompts/demos.txt""",
}

LAUNCH = "torchrun --nnodes=8 --nproc_per_node=8 --rdzv_id=5235 --rdzv_backend=c10d --rdzv_endpoint $MASTER_ADDR"
TRAIN = {name: f"{LAUNCH} train.py --config_path configs/{config}.yaml --logdir logs/{logdir}"
         for name, config, logdir in [
    ("stage1_framewise", "ar_diffusion_tf_framewise", "ar_diffusion_framewise"),
    ("stage1_chunkwise", "ar_diffusion_tf_chunkwise", "ar_diffusion_chunkwise"),
    ("ode_framewise", "causal_ode_framewise", "causal_ode_framewise"),
    ("ode_chunkwise", "causal_ode_chunkwise", "causal_ode_chunkwise"),
    ("cd_framewise", "causal_cd_framewise", "causal_cd_framewise"),
    ("cd_chunkwise", "causal_cd_chunkwise", "causal_cd_chunkwise"),
    ("dmd_framewise", "causal_forcing_dmd_framewise", "causal_forcing_dmd_framewise"),
    ("dmd_framewise_2step", "causal_forcing_dmd_framewise_2step", "causal_forcing_dmd_framewise"),
    ("dmd_framewise_1step", "causal_forcing_dmd_framewise_1step", "causal_forcing_dmd_framewise"),
    ("dmd_chunkwise", "causal_forcing_dmd_chunkwise", "causal_forcing_dmd_chunkwise"),
]}

DATA = [   # Stage 1 and Stage 2a data preparation, in the README's order
    "python utils/merge_and_get_clean.py",
    """torchrun --nproc_per_node=8 \\
  get_causal_ode_data_framewise.py \\
  --generator_ckpt checkpoints/framewise/ar_diffusion.pt \\
  --rawdata_path dataset/clean_data \\
  --output_folder dataset/ODE6KCausal_framewise_latents""",
    """python utils/create_lmdb_iterative.py \\
  --data_path dataset/ODE6KCausal_framewise_latents \\
  --lmdb_path dataset/ODE6KCausal_framewise""",
    """torchrun --nproc_per_node=8 \\
  get_causal_ode_data_chunkwise.py \\
  --generator_ckpt checkpoints/chunkwise/ar_diffusion.pt \\
  --rawdata_path dataset/clean_data \\
  --output_folder dataset/ODE6KCausal_chunkwise_latents""",
    """python utils/create_lmdb_iterative.py \\
  --data_path dataset/ODE6KCausal_chunkwise_latents \\
  --lmdb_path dataset/ODE6KCausal_chunkwise""",
    """torchrun --nproc_per_node=8 \\
  get_causal_ode_data_kv.py \\
  --generator_ckpt checkpoints/chunkwise/ar_diffusion.pt \\
  --rawdata_path dataset/clean_data \\
  --output_folder dataset/ODE6KCausal_chunkwise_kv_latents \\
  --num_frames_per_chunk 3 \\
  --generation_mode blockwise_kv""",
]


def words_of(command: str) -> list[str]:
    """The words a POSIX shell makes of ``command`` (backslash-newline continues the line), never run through a
    shell: ``$MASTER_ADDR`` stays a word of the dropped launcher."""
    return shlex.split(command.replace("\\\n", " "))


def run(world: Path, command: str, monkeypatch) -> int:
    """``command`` with ``world`` as the working directory: launcher words dropped, the script run as __main__."""
    words = words_of(command)
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    script, argv = words[i], words[i + 1:]
    monkeypatch.chdir(world)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as done:
        return done.code or 0
    return 0


def published_entries(sd: dict, entries, seed: int) -> dict:
    """A checkpoint as the published trainers wrote it: ``generator`` under ``model.``, ``generator_ema`` under the
    FSDP-internal ``model._fsdp_wrapped_module.`` prefix (their EMA helper's names)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in entries:
        prefix = "model._fsdp_wrapped_module." if name == "generator_ema" else "model."
        out[name] = {prefix + k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    return out


def fake_ode_shard(folder: Path, name: str, captions) -> None:
    """A downloaded ODE-pair shard ``dataset/<name>_0``: rows [6, F, C, H, W] (4 states, output, ground truth)."""
    files = folder / f".{name}_files"
    files.mkdir()
    g = torch.Generator().manual_seed(len(name))
    for i, caption in enumerate(captions):
        torch.save({caption: torch.randn(1, 6, FRAMES, *LATENT, generator=g)}, files / f"{i:05d}.pt")
    create_ode_lmdb(files, folder / f"{name}_0")
    shutil.rmtree(files)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    for name in ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B"):
        write_tiny_wan_folder(root / "wan_models" / name)
    (root / "configs").mkdir()
    for name in CONFIGS:
        (root / "configs" / f"{name}.yaml").write_text(f"base: {REPO / 'configs' / name}.yaml\n{TINY}")
    sd = read_state_dict(root / "wan_models" / "Wan2.1-T2V-1.3B")
    for i, (filename, entries) in enumerate(RELEASED.items()):
        (root / "checkpoints" / filename).parent.mkdir(parents=True, exist_ok=True)
        torch.save(published_entries(sd, entries, i), root / "checkpoints" / filename)
    (root / "dataset").mkdir()
    for name in ("ODE6KCausal_chunkwise", "ODE6KCausal_framewise"):
        fake_ode_shard(root / "dataset", name, DEFAULT_SENTENCES[:2])
    (root / "prompts").mkdir()
    (root / "prompts" / "demos.txt").write_text(DEFAULT_SENTENCES[0] + "\n")
    (root / "prompts" / "vidprom_filtered_extended.txt").write_text("\n".join(DEFAULT_SENTENCES[:4]) + "\n")
    shutil.copytree(REPO / "prompts" / "i2v", root / "prompts" / "i2v")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices on a shared CPU: more threads only add contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(world):
    """The README's data commands (needed by Stage 1 and Stage 2a), run once; their outputs are tested below."""
    with pytest.MonkeyPatch.context() as mp:
        codes = [run(world, command, mp) for command in DATA]
    return codes


@pytest.mark.parametrize("name", list(INFERENCE))
def test_inference_command(world, monkeypatch, name):
    assert run(world, INFERENCE[name], monkeypatch) == 0
    words = words_of(INFERENCE[name])
    prompt = read_image_prompts(world / "prompts" / "i2v")[0][1] if "--i2v" in words else DEFAULT_SENTENCES[0]
    assert (world / words[words.index("--output_folder") + 1] / f"{safe_output_name(prompt)}.mp4").is_file()


def test_data_commands(world, data):
    assert data == [0] * len(DATA)
    assert len(LatentLMDBDataset(world / "dataset" / "clean_data")) == 2
    for variant in ("framewise", "chunkwise"):
        pairs = ODERegressionLMDBDataset(world / "dataset" / f"ODE6KCausal_{variant}")
        assert len(pairs) == 2
    assert len(list((world / "dataset" / "ODE6KCausal_chunkwise_kv_latents").glob("*.pt"))) == 2


def test_prepared_pairs_merge(world, tmp_path, monkeypatch):
    """The alternative to generating ODE pairs: the downloaded shards merged by ``python utils/merge_lmdb.py``."""
    for name in ("ODE6KCausal_chunkwise_0", "ODE6KCausal_framewise_0"):
        shutil.copytree(world / "dataset" / name, tmp_path / "dataset" / name)
    assert run(tmp_path, "python utils/merge_lmdb.py", monkeypatch) == 0
    assert len(ODERegressionLMDBDataset(tmp_path / "dataset" / "ODE6KCausal_framewise")) == 2


@pytest.mark.parametrize("name", list(TRAIN))
def test_training_command(world, data, monkeypatch, name):
    assert run(world, TRAIN[name], monkeypatch) == 0
    logdir = world / words_of(TRAIN[name])[-1]
    assert (logdir / "checkpoint_model_000001" / "model.pt").is_file()


# ------------------------------------------------------------------------------------------------ flags of the scripts


def test_stage3_starts_from_an_ema_only_stage2_checkpoint(world, monkeypatch, caplog):
    """The published CD trainer writes only generator_ema once its EMA started; Stage 3 starts from it (the
    generator_ckpt loader falls back to that entry, as the published one does, and says so)."""
    command = ("python train.py --config_path configs/causal_forcing_dmd_framewise.yaml --logdir logs/from_cd "
               "--override generator_ckpt=checkpoints/framewise/causal_cd.pt")
    with caplog.at_level(logging.WARNING, logger="model.loader"):
        assert run(world, command, monkeypatch) == 0
    assert "loading its 'generator_ema' weights" in caplog.text


def test_missing_released_checkpoint_names_its_download(world, monkeypatch, capsys):
    command = ("python train.py --config_path configs/causal_forcing_dmd_chunkwise.yaml --logdir logs/missing "
               "--override generator_ckpt=elsewhere/chunkwise/causal_cd.pt")
    assert run(world, command, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("hf download zhuhz22/Causal-Forcing chunkwise/causal_cd.pt --local-dir elsewhere"), err


def test_train_accepts_tf(world, data, monkeypatch):
    command = "python train.py --config_path configs/ar_diffusion_tf_framewise.yaml --logdir logs/tf --tf --no_save"
    assert run(world, command, monkeypatch) == 0


def test_report_timing(world, tmp_path, monkeypatch, capsys):
    """--report_timing: the first video warms up; every later one prints its first-frame latency, FPS and one time
    per block (frame-wise: 6 blocks)."""
    (world / "prompts" / "three.txt").write_text("\n".join(DEFAULT_SENTENCES[1:4]) + "\n")
    command = ("python inference.py --config_path configs/causal_forcing_dmd_framewise.yaml --output_folder "
               f"{tmp_path} --checkpoint_path checkpoints/framewise/causal_forcing.pt --data_path prompts/three.txt "
               "--report_timing")
    assert run(world, command, monkeypatch) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[timing]")]
    assert len(lines) == 2
    for line in lines:
        assert "first frame after" in line and "FPS" in line
        assert len(line.split("per block (ms, generation + decoding): ")[1].split()) == FRAMES
    command = command.replace("prompts/three.txt", "prompts/demos.txt").replace(str(tmp_path), str(tmp_path / "one"))
    assert run(world, command, monkeypatch) == 0
    assert "needs at least 2 videos" in capsys.readouterr().out


def our_readme_checkpoint_commands() -> list[str]:
    """The ``python inference.py`` commands of our README's released-checkpoint block (one per released file)."""
    text = (REPO / "README.md").read_text()
    block = next(b for b in text.split("```bash")[1:] if "chunkwise/longvideo.pt --local-dir" in b).split("```")[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python inference.py")]


@pytest.mark.parametrize("command", our_readme_checkpoint_commands(),
                         ids=lambda c: words_of(c)[words_of(c).index("--checkpoint_path") + 1])
def test_our_readme_runs_every_released_checkpoint(world, monkeypatch, command):
    assert run(world, command, monkeypatch) == 0
    words = words_of(command)
    video = f"{safe_output_name(DEFAULT_SENTENCES[0])}.mp4"
    assert (world / words[words.index("--output_folder") + 1] / video).is_file()
