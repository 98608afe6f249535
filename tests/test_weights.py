"""Weights-folder and checkpoint-file checks: every missing file named, with the command that fetches it."""

import json

import pytest

from model.weights import (
    RELEASED_CHECKPOINTS,
    WAN_DIT_CONFIG,
    WAN_DIT_INDEX,
    WAN_DIT_WEIGHTS,
    WAN_PARTS,
    WAN_T5_FILENAME,
    WAN_TOKENIZER_SUBDIR,
    WAN_VAE_FILENAME,
    check_file,
    download_hint_for_checkpoint,
    missing_wan_parts,
    shard_names,
    wan_download_hint,
    wan_repo_id,
)
from utils.errors import WeightsMissingError


def _touch(folder, *names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def _complete_common(folder, tokenizer_file="spiece.model"):
    _touch(folder, WAN_DIT_CONFIG, WAN_T5_FILENAME, WAN_VAE_FILENAME, f"{WAN_TOKENIZER_SUBDIR}/{tokenizer_file}")


def _write_index(folder, shards):
    weight_map = {f"blocks.{i}.w": shard for i, shard in enumerate(shards)}
    (folder / WAN_DIT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_empty_or_absent_folder_misses_every_part_and_names_the_command(tmp_path):
    """missing_wan_parts is what resolve_wan_folder downloads; the loaders name their own missing file."""
    folder = tmp_path / "wan_models" / "Wan2.1-T2V-1.3B"
    assert missing_wan_parts(folder) == list(WAN_PARTS)
    folder.mkdir(parents=True)
    assert missing_wan_parts(folder) == list(WAN_PARTS)
    assert wan_download_hint(folder) == f"get them with: hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir {folder}"


def test_partial_folder_misses_only_its_parts(tmp_path):
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    _touch(folder, WAN_DIT_CONFIG, WAN_VAE_FILENAME, f"{WAN_TOKENIZER_SUBDIR}/tokenizer.json")
    assert missing_wan_parts(folder) == ["dit", "text_encoder"]
    _touch(folder, WAN_DIT_WEIGHTS)
    assert missing_wan_parts(folder) == ["text_encoder"]


def test_sharded_14b_with_a_missing_shard(tmp_path):
    folder = tmp_path / "Wan2.1-T2V-14B"
    shards = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    _complete_common(folder)
    _write_index(folder, shards)
    _touch(folder, shards[0], shards[2])
    assert missing_wan_parts(folder) == ["dit"]
    _touch(folder, shards[1])
    assert missing_wan_parts(folder) == []
    assert f"hf download Wan-AI/Wan2.1-T2V-14B --local-dir {folder}" in wan_download_hint(folder)
    assert shard_names(folder / WAN_DIT_INDEX) == shards


def test_unreadable_index_or_no_config_misses_the_dit(tmp_path):
    folder = tmp_path / "Wan2.1-T2V-14B"
    _complete_common(folder)
    (folder / WAN_DIT_INDEX).write_text("{not json")
    assert missing_wan_parts(folder) == ["dit"]
    (folder / WAN_DIT_INDEX).unlink()
    (folder / WAN_DIT_CONFIG).unlink()
    _touch(folder, WAN_DIT_WEIGHTS)
    assert missing_wan_parts(folder) == ["dit"]


def test_need_restricts_the_check(tmp_path):
    folder = tmp_path / "Wan2.1-T2V-14B"
    _touch(folder, WAN_T5_FILENAME, f"{WAN_TOKENIZER_SUBDIR}/spiece.model")
    assert missing_wan_parts(folder, need=("text_encoder", "tokenizer")) == []
    assert missing_wan_parts(folder, need=("vae",)) == ["vae"]


def test_repo_id_from_name_and_generic_hint(tmp_path):
    assert wan_repo_id("wan_models/Wan2.1-T2V-1.3B") == "Wan-AI/Wan2.1-T2V-1.3B"
    assert wan_repo_id("wan_models/Wan2.1-T2V-14B/") == "Wan-AI/Wan2.1-T2V-14B"
    assert wan_repo_id("my_weights") is None
    generic = wan_download_hint(tmp_path / "my_weights")
    assert "Wan-AI/my_weights" not in generic and "download the matching Wan2.1 repository" in generic


@pytest.mark.parametrize("filename", [f"{variant}/{stage}.pt" for variant in ("framewise", "chunkwise")
                                      for stage in ("causal_forcing", "ar_diffusion", "causal_ode", "causal_cd")]
                         + ["causal-forcing++/framewise-2step.pt", "causal-forcing++/framewise-1step.pt",
                            "chunkwise/longvideo.pt"])
def test_download_hint_for_released_checkpoints(filename):
    assert filename in RELEASED_CHECKPOINTS
    expected = f"hf download zhuhz22/Causal-Forcing {filename} --local-dir checkpoints"
    assert download_hint_for_checkpoint(f"checkpoints/{filename}") == expected


def test_readme_lists_every_released_checkpoint(repo_root):
    """README.md names every file of the model repository with its download line (the hint's own command)."""
    readme = (repo_root / "README.md").read_text()
    for filename in RELEASED_CHECKPOINTS:
        assert f"hf download zhuhz22/Causal-Forcing {filename} --local-dir checkpoints" in readme, filename
        assert f"--checkpoint_path checkpoints/{filename}" in readme, filename


def test_download_hint_other_paths():
    assert download_hint_for_checkpoint("/data/ckpt/chunkwise/causal_forcing.pt") == (
        "hf download zhuhz22/Causal-Forcing chunkwise/causal_forcing.pt --local-dir /data/ckpt")
    assert download_hint_for_checkpoint("chunkwise/causal_forcing.pt").endswith("--local-dir .")
    assert download_hint_for_checkpoint("logs/run/checkpoint_model_000100/model.pt") is None
    assert download_hint_for_checkpoint("checkpoints/chunkwise/causal_forcing_v2.pt") is None
    assert download_hint_for_checkpoint("framewise-2step.pt") is None
    assert download_hint_for_checkpoint("checkpoints/causal-forcing++/framewise-3step.pt") is None


def test_check_file(tmp_path):
    present = tmp_path / "x.pt"
    present.write_bytes(b"")
    check_file(present, "checkpoint")

    missing = tmp_path / "checkpoints" / "framewise" / "causal_forcing.pt"
    with pytest.raises(WeightsMissingError, match="checkpoint not found") as info:
        check_file(missing, "checkpoint")
    assert f"hf download zhuhz22/Causal-Forcing framewise/causal_forcing.pt --local-dir {tmp_path / 'checkpoints'}" \
        in str(info.value)

    with pytest.raises(WeightsMissingError, match="run the ODE script first"):
        check_file(tmp_path / "other.pt", "ODE data", "run the ODE script first")
    with pytest.raises(WeightsMissingError) as info:
        check_file(tmp_path / "other.pt", "checkpoint")
    assert "get it with" not in str(info.value)


def test_a_checkpoint_needs_no_dit_folder_and_a_missing_one_names_where_it_goes(tmp_path, monkeypatch):
    """``generator_name: Wan2.1-T2V-1.3B`` with no such folder under ``wan_models_dir``, offline: with a checkpoint
    (``weights=False``) the released architecture is built for the checkpoint to fill, nothing fetched; without
    one, and for the text encoder and the VAE, one line whose command downloads the folder to where the config
    looks for it."""
    import re

    from model.config import get_preset
    from model.loader import _resolve_source
    from pipeline.components import build_text_encoder, build_vae, model_source
    from utils.config import Config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = Config(trainer="score_distillation", wan_models_dir=str(tmp_path / "wan_models"),
                 generator_name="Wan2.1-T2V-1.3B")
    config, folder = _resolve_source(model_source(cfg, cfg.generator_name, weights=False))
    assert config == get_preset("Wan2.1-T2V-1.3B") and folder is None
    where = re.escape(f"--local-dir {tmp_path / 'wan_models' / 'Wan2.1-T2V-1.3B'}")
    for build in (lambda cfg: model_source(cfg, cfg.generator_name), build_text_encoder, build_vae):
        with pytest.raises(WeightsMissingError, match=where):
            build(cfg)
    assert not (tmp_path / "wan_models").exists()
