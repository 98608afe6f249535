"""LMDB store and the reference LMDB tools (build from .pt files, merge shards, extract clean latents)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.create_lmdb_iterative import create_ode_lmdb
from utils.errors import DataError
from utils.lmdb_store import LMDBReader, LMDBWriter, open_env, open_many
from utils.merge_lmdb import find_shards, merge_lmdbs

REPO = Path(__file__).resolve().parents[1]
ROW = (3, 2, 4, 4, 6)  # [S, F, C, H, W], tiny stand-in for [6, 21, 16, 60, 104]


def raw_get(path, key: str) -> bytes | None:
    """A key's stored bytes, read straight from LMDB (independent of LMDBReader's decoding)."""
    with open_env(path).begin() as txn:
        return txn.get(key.encode())


def make_db(path, rows: int, seed: int, prompt_prefix: str = "p", row_shape=ROW):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((rows, *row_shape)).astype(np.float16)
    prompts = [f"{prompt_prefix}{i} ünïcødé 🐱" for i in range(rows)]
    with LMDBWriter(path) as writer:
        writer.append(latents, prompts)
    return latents, prompts


def test_round_trip_is_exact_and_byte_compatible(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((5, *ROW)).astype(np.float32)
    prompts = ["a cat", "ein Hund", "猫", "emoji 🐶", "tab\tand\nnewline"]
    with LMDBWriter(tmp_path / "db") as writer:
        writer.append(latents[:2], prompts[:2])
        writer.append(torch.from_numpy(latents[2:]), prompts[2:])  # tensors are accepted too
    reader = LMDBReader(tmp_path / "db")
    assert len(reader) == 5 and reader.shape("latents") == (5, *ROW) and reader.shape("prompts") == (5,)
    for i in range(5):
        row = reader.get("latents", i)
        assert row.dtype == np.float16 and np.array_equal(row, latents[i].astype(np.float16))  # exact
        assert reader.get("prompts", i) == prompts[i]
    # On-disk layout of the reference: raw little-endian fp16 C-order rows and space-separated shape keys.
    assert raw_get(tmp_path / "db", "latents_shape") == b"5 3 2 4 4 6"
    assert raw_get(tmp_path / "db", "prompts_shape") == b"5"
    assert raw_get(tmp_path / "db", "latents_3_data") == latents[3].astype("<f2").tobytes(order="C")
    assert raw_get(tmp_path / "db", "prompts_2_data") == "猫".encode("utf-8")


def test_bfloat16_tensor_and_overflow(tmp_path):
    x = torch.randn(2, 3, 4).to(torch.bfloat16)
    with LMDBWriter(tmp_path / "bf16") as writer:
        writer.append(x, ["a", "b"])
    assert np.array_equal(LMDBReader(tmp_path / "bf16").get("latents", 1), x[1].float().numpy().astype(np.float16))
    with pytest.raises(DataError, match="overflow"), LMDBWriter(tmp_path / "big") as writer:
        writer.append(np.full((1, 2), 1e6, dtype=np.float32), ["x"])


def test_map_grows_from_tiny_map_size(tmp_path):
    latents = np.random.default_rng(1).standard_normal((40, 64, 64)).astype(np.float16)  # 320 KiB
    with LMDBWriter(tmp_path / "db", map_size=16 * 1024) as writer:
        for i in range(0, 40, 8):
            writer.append(latents[i:i + 8], [str(j) for j in range(i, i + 8)])
    reader = LMDBReader(tmp_path / "db")
    assert reader.env.info()["map_size"] > 16 * 1024
    assert len(reader) == 40 and np.array_equal(reader.get("latents", 39), latents[39])


def test_interrupted_build_is_refused(tmp_path):
    with pytest.raises(RuntimeError), LMDBWriter(tmp_path / "db") as writer:
        writer.append(np.zeros((2, 3), np.float16), ["a", "b"])
        raise RuntimeError("killed mid-build")
    with pytest.raises(DataError, match="no shape keys"):
        LMDBReader(tmp_path / "db")
    with pytest.raises(DataError, match="already holds data"):  # a new build must not mix with the old rows
        LMDBWriter(tmp_path / "db")


def test_writer_and_reader_errors(tmp_path):
    with pytest.raises(DataError, match="LMDB not found"):
        LMDBReader(tmp_path / "missing")
    with pytest.raises(DataError, match="no rows"), LMDBWriter(tmp_path / "empty"):
        pass
    with pytest.raises(DataError, match="row shape"), LMDBWriter(tmp_path / "mixed") as writer:
        writer.append(np.zeros((1, 2, 3)), ["a"])
        writer.append(np.zeros((1, 3, 2)), ["b"])
    with pytest.raises(ValueError, match="prompts"), LMDBWriter(tmp_path / "count") as writer:
        writer.append(np.zeros((2, 3)), ["only one"])
    make_db(tmp_path / "ok", 2, 0)
    reader = LMDBReader(tmp_path / "ok")
    with pytest.raises(IndexError):
        reader.get("latents", 2)
    assert reader.get("prompts", -1) == reader.get("prompts", 1)


def test_open_many_natural_order_and_global_index(tmp_path):
    parts = {i: make_db(tmp_path / "shards" / f"s_{i}", rows, seed=i, prompt_prefix=f"s{i}-")
             for i, rows in [(0, 2), (10, 3), (2, 1)]}
    reader = open_many(tmp_path / "shards")
    assert [Path(p).name for p in reader.paths] == ["s_0", "s_2", "s_10"] and len(reader) == 6
    assert reader.shape("latents") == (6, *ROW)
    expected = [(lat, p) for i in (0, 2, 10) for lat, p in zip(*parts[i])]  # s_2 before s_10
    for k, (lat, prompt) in enumerate(expected):
        assert reader.get("prompts", k) == prompt and np.array_equal(reader.get("latents", k), lat)
    assert open_many(tmp_path / "shards" / "s_0").paths == [str(tmp_path / "shards" / "s_0")]
    make_db(tmp_path / "shards" / "s_3", 1, 0, row_shape=(2, 2))
    with pytest.raises(DataError, match="unlike"):
        open_many(tmp_path / "shards")


def save_pt(path, prompt: str, trajectory: torch.Tensor):
    torch.save({prompt: trajectory}, path)


def test_create_ode_lmdb_duplicate_in_last_file(tmp_path):
    """The reference took the shape key from the last file; a skipped duplicate there made it just "N"."""
    data = tmp_path / "pt"
    data.mkdir()
    trajectories = [torch.randn(1, *ROW), torch.randn(*ROW), torch.randn(1, *ROW)]
    save_pt(data / "00000.pt", "a red circle", trajectories[0])
    save_pt(data / "00001.pt", "a blue square", trajectories[1])
    save_pt(data / "00002.pt", "a red circle", trajectories[2])  # duplicate prompt in the LAST file
    rows = create_ode_lmdb(data, tmp_path / "ode", map_size=1 << 16)
    assert rows == 2
    assert raw_get(tmp_path / "ode", "latents_shape") == b"2 3 2 4 4 6"
    assert raw_get(tmp_path / "ode", "prompts_shape") == b"2"
    reader = LMDBReader(tmp_path / "ode")
    assert [reader.get("prompts", i) for i in range(2)] == ["a red circle", "a blue square"]
    assert np.array_equal(reader.get("latents", 0), trajectories[0][0].numpy().astype(np.float16))  # first kept
    assert np.array_equal(reader.get("latents", 1), trajectories[1].numpy().astype(np.float16))


def test_create_ode_lmdb_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        create_ode_lmdb(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "pt").mkdir()
    with pytest.raises(DataError, match="no .pt files"):
        create_ode_lmdb(tmp_path / "pt", tmp_path / "out")
    save_pt(tmp_path / "pt" / "0.pt", "x", torch.randn(2, 4, 4))
    with pytest.raises(DataError, match="expected"):
        create_ode_lmdb(tmp_path / "pt", tmp_path / "out2")


def test_create_lmdb_script_runs_from_repo_root(tmp_path):
    """`python utils/create_lmdb_iterative.py ...` must work as in the README (script-mode imports)."""
    data = tmp_path / "pt"
    data.mkdir()
    for i in range(3):
        save_pt(data / f"{i:05d}.pt", f"prompt {i}", torch.randn(1, *ROW))
    cmd = [sys.executable, "utils/create_lmdb_iterative.py", "--data_path", str(data), "--lmdb_path",
           str(tmp_path / "ode")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert LMDBReader(tmp_path / "ode").shape("latents") == (3, *ROW)


@pytest.mark.parametrize("script", ["create_lmdb_iterative", "merge_lmdb", "merge_and_get_clean"])
def test_published_scripts_import_the_checkout_they_are_in(tmp_path, script):
    """Run as files, as the published README runs them, the scripts import their own checkout: also where the project
    is not installed (``python -S``: no .pth file runs, so no editable install either; the site-packages come from
    PYTHONPATH) and where a decoy ``utils`` is ahead on the path, as another clone's install would be."""
    import site

    decoy = tmp_path / "decoy" / "utils"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy utils, not this checkout')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(decoy.parent), *site.getsitepackages()]))
    run = subprocess.run([sys.executable, "-S", str(REPO / "utils" / f"{script}.py"), "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage" in run.stdout, run.stderr[-1500:]


def make_shards(directory, base: str, sizes):
    return [make_db(directory / f"{base}_{i}", n, seed=i, prompt_prefix=f"{i}-") for i, n in enumerate(sizes)]


def test_merge_scripts_without_shards_name_the_published_download(tmp_path, capsys):
    """No shards in ``--data_dir``: one line naming the published dataset's download into that folder, exit status 1;
    with one name's shards there, those are merged and the missing name is reported on one line."""
    from utils import merge_and_get_clean, merge_lmdb

    hint = f"the published shards: hf download zhuhz22/Causal-Forcing-data --local-dir {tmp_path}"
    assert merge_lmdb.main(["--data_dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: no LMDB shards ODE6KCausal_framewise_<i> or ODE6KCausal_chunkwise_<i> in {tmp_path}; {hint}"]
    assert merge_and_get_clean.main(["--data_dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: no LMDB shards ODE6KCausal_chunkwise_<i> in {tmp_path}; {hint}"]
    make_shards(tmp_path, "ODE6KCausal_chunkwise", [2, 1])
    assert merge_lmdb.main(["--data_dir", str(tmp_path)]) == 0
    last = capsys.readouterr().err.splitlines()[-1]   # after the merge's progress bar
    assert last == f"skipping: no LMDB shards ODE6KCausal_framewise_<i> in {tmp_path}; {hint}"
    assert LMDBReader(tmp_path / "ODE6KCausal_chunkwise").shape("latents") == (3, *ROW)


def test_merge_round_trip_keeps_sources_by_default(tmp_path):
    parts = make_shards(tmp_path, "ODE_chunk", [3, 1, 2])
    shards = find_shards(tmp_path, "ODE_chunk")
    assert [p.name for p in shards] == ["ODE_chunk_0", "ODE_chunk_1", "ODE_chunk_2"]
    assert merge_lmdbs(shards, tmp_path / "ODE_chunk", batch_rows=2) == 6
    merged = LMDBReader(tmp_path / "ODE_chunk")
    assert merged.shape("latents") == (6, *ROW)
    expected = [(lat, p) for latents, prompts in parts for lat, p in zip(latents, prompts)]
    for k, (lat, prompt) in enumerate(expected):
        assert merged.get("prompts", k) == prompt and np.array_equal(merged.get("latents", k), lat)
    assert all(p.exists() for p in shards)
    assert find_shards(tmp_path, "ODE_chunk") == shards  # the merged db is not mistaken for a shard


def test_merge_delete_sources_and_shape_mismatch(tmp_path):
    make_shards(tmp_path, "b", [1, 1])
    shards = find_shards(tmp_path, "b")
    merge_lmdbs(shards, tmp_path / "b", delete_sources=True)
    assert not any(p.exists() for p in shards) and len(LMDBReader(tmp_path / "b")) == 2
    make_db(tmp_path / "c_0", 1, 0)
    make_db(tmp_path / "c_1", 1, 0, row_shape=(2, 2))
    with pytest.raises(DataError, match="unlike"):
        merge_lmdbs(find_shards(tmp_path, "c"), tmp_path / "c")


def test_extract_clean_takes_last_slot(tmp_path):
    parts = make_shards(tmp_path, "ODE", [2, 3])
    assert merge_lmdbs(find_shards(tmp_path, "ODE"), tmp_path / "clean_data", keep_last_slot=True) == 5
    clean = LMDBReader(tmp_path / "clean_data")
    assert clean.shape("latents") == (5, 1, *ROW[1:])
    assert raw_get(tmp_path / "clean_data", "latents_shape") == b"5 1 2 4 4 6"
    expected = [(lat, p) for latents, prompts in parts for lat, p in zip(latents, prompts)]
    for k, (lat, prompt) in enumerate(expected):
        assert clean.get("prompts", k) == prompt and np.array_equal(clean.get("latents", k)[0], lat[-1])
    assert os.path.isdir(tmp_path / "ODE_0") and os.path.isdir(tmp_path / "ODE_1")  # nothing deleted


def damage(path, how: str) -> None:
    """Cut ``path/data.mdb`` short (as an interrupted copy), fill it with garbage, or empty it."""
    data = Path(path) / "data.mdb"
    size = data.stat().st_size
    if how == "truncated":
        os.truncate(data, size // 2)
    elif how == "two_pages":          # both meta pages intact, every data page gone
        os.truncate(data, 2 * 4096)
    elif how == "garbage":
        data.write_bytes(np.random.default_rng(0).bytes(size))
    else:
        data.write_bytes(b"")


def test_truncated_lmdb_is_one_line_not_sigbus(tmp_path):
    """A data.mdb cut short is refused on open, in a separate process: reading a page past the end of the memory
    map would kill the process with SIGBUS, so the check must come first. The merge tool exits 1 with one line."""
    make_shards(tmp_path, "ODE", [40])
    damage(tmp_path / "ODE_0", "truncated")
    script = f"from utils.lmdb_store import LMDBReader\nr = LMDBReader({str(tmp_path / 'ODE_0')!r})\n" \
             f"[r.get('latents', i) for i in range(len(r))]"
    read = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert read.returncode == 1 and "DataError: LMDB" in read.stderr and "is truncated" in read.stderr, read.stderr
    merge = subprocess.run([sys.executable, "utils/merge_lmdb.py", "--data_dir", str(tmp_path), "--names", "ODE"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert merge.returncode == 1, merge.stderr
    assert merge.stderr.startswith("error: LMDB") and merge.stderr.count("\n") == 1 and "truncated" in merge.stderr


@pytest.mark.parametrize("how", ["two_pages", "garbage", "empty"])
def test_damaged_lmdb_is_a_data_error(tmp_path, how):
    """Garbage, an empty data.mdb, or one holding its meta pages only: a one-line DataError naming the database, from
    the reader and the training dataset on it; a writer asked to reuse a damaged folder refuses it too (an empty
    file is simply a new database to LMDB)."""
    from utils.datasets import LatentLMDBDataset

    make_db(tmp_path / "db", 40, seed=0)
    damage(tmp_path / "db", how)
    for open_it in (LMDBReader, LatentLMDBDataset):
        with pytest.raises(DataError, match=r"LMDB .*db (is truncated|is unreadable)") as err:
            open_it(tmp_path / "db")
        assert "\n" not in str(err.value)
    if how != "empty":
        with pytest.raises(DataError, match=r"LMDB .*db (is truncated|could not be written)"):
            LMDBWriter(tmp_path / "db")


def test_full_disk_while_writing_is_a_data_error(tiny_disk):
    """A disk that fills while rows are written: one DataError naming the database; it is left without shape keys,
    so readers refuse it as an incomplete build."""
    from tests.conftest import fill_disk

    fill_disk(tiny_disk, leave=64 * 1024)
    rows = np.random.default_rng(0).standard_normal((64, *ROW)).astype(np.float16)   # 64 x 1.1 KiB per write
    with pytest.raises(DataError, match=r"LMDB .*db could not be written \(.*\); is the disk full\?") as err:
        with LMDBWriter(tiny_disk / "db", map_size=1 << 20) as writer:
            for _ in range(8):
                writer.append(rows, ["p"] * len(rows))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no shape keys|is truncated|unreadable"):
        LMDBReader(tiny_disk / "db")
