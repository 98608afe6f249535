"""Bad flags and paths of the command-line tools: each is refused with one line on stderr, no traceback, a non-zero
exit code, before any model is built or anything is written."""

import os

import numpy as np
import pytest
import torch

import get_causal_ode_data
import inference
from app import encode_videos
from utils import create_lmdb_iterative, merge_and_get_clean, merge_lmdb
from utils.lmdb_store import LMDBWriter


@pytest.fixture
def shard(tmp_path):
    """One tiny ODE LMDB shard ``tmp_path/ODE_0``."""
    with LMDBWriter(tmp_path / "ODE_0") as writer:
        writer.append(np.zeros((1, 2, 1, 4, 2, 2), np.float16), ["a prompt"])
    return tmp_path


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--num_steps", "0"], "--num_steps must be >= 1, got 0"),
    (["--max_samples", "-1"], "--max_samples must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--shift", "0"], "--shift must be > 0, got 0.0"),
    (["--seed", str(2**31)], "--seed must be in [0, 2^31), got 2147483648"),
    (["--seed", "-1"], "--seed must be in [0, 2^31)"),
    (["--output_folder", "FILE"], "is a file, not a folder"),
])
def test_ode_data_flags(tmp_path, capsys, flags, message):
    (tmp_path / "file").write_text("")
    flags = [str(tmp_path / "file") if f == "FILE" else f for f in flags]
    argv = ["--generator_ckpt", "missing.pt", "--rawdata_path", "missing", "--output_folder", str(tmp_path / "out"),
            *flags]
    assert get_causal_ode_data.main(argv) == 1
    assert message in one_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["merge_lmdb", "merge_and_get_clean"])
def test_batch_rows_zero(shard, capsys, tool):
    if tool == "merge_lmdb":
        code = merge_lmdb.main(["--data_dir", str(shard), "--names", "ODE", "--batch_rows", "0"])
    else:
        code = merge_and_get_clean.main(["--data_dir", str(shard), "--name", "ODE", "--batch_rows", "0"])
    assert code == 1 and "--batch_rows) must be >= 1, got 0" in one_line(capsys)
    assert sorted(os.listdir(shard)) == ["ODE_0"]


def test_negative_map_size(tmp_path, capsys):
    (tmp_path / "pt").mkdir()
    torch.save({"p": torch.zeros(1, 2, 1, 4, 2, 2)}, tmp_path / "pt" / "00000.pt")
    argv = ["--data_path", str(tmp_path / "pt"), "--lmdb_path", str(tmp_path / "db"), "--map_size", "-5"]
    assert create_lmdb_iterative.main(argv) == 1
    assert "--map_size) must be a positive number of bytes, got -5" in one_line(capsys)
    assert not (tmp_path / "db").exists()
    assert encode_videos.main(["--input_dir", str(tmp_path), "--lmdb_path", str(tmp_path / "db"),
                               "--map_size", "-5"]) == 2
    assert "--map_size must be >= 1, got -5" in one_line(capsys)


def test_lmdb_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "pt").mkdir()
    torch.save({"p": torch.zeros(1, 2, 1, 4, 2, 2)}, tmp_path / "pt" / "00000.pt")
    (tmp_path / "db").write_text("")
    assert create_lmdb_iterative.main(["--data_path", str(tmp_path / "pt"), "--lmdb_path", str(tmp_path / "db")]) == 1
    assert "db is a file, not a folder" in one_line(capsys)


@pytest.mark.parametrize("flags,message", [
    (["--num_samples", "-1"], "--num_samples must be >= 1, got -1"),
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
    (["--output_folder", "FILE"], "--output_folder {FILE} is a file, not a folder"),
    (["--checkpoint_path", "EMPTY"], "cannot read {EMPTY}: EOFError (empty or cut-short file?)"),
])
def test_inference_flags(repo_root, tmp_path, capsys, flags, message):
    """On the shipped toy model (the empty checkpoint is found only when the model is built)."""
    paths = {"FILE": tmp_path / "file", "EMPTY": tmp_path / "empty.pt"}
    for path in paths.values():
        path.write_bytes(b"")
    flags = [str(paths.get(f, f)) for f in flags]
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    argv = ["--config_path", str(repo_root / "configs" / "toy" / "causal_forcing_dmd_chunkwise.yaml"),
            "--data_path", str(tmp_path / "prompts.txt"), "--output_folder", str(tmp_path / "out"), "--device", "cpu",
            "--no_compile", *flags]
    cwd = os.getcwd()
    os.chdir(repo_root)   # the toy config's paths are relative to the repository
    try:
        assert inference.main(argv) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: ") and message.format(**paths) in last, err
