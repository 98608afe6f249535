"""Atomic writes (utils/io.py): the final name holds the old file or the complete new one, never a partial one."""

import os

import pytest
import torch

from utils.io import TEMP_PREFIX, AtomicPath, is_temp, remove_stale_temps


def test_success_replaces_and_leaves_no_temp(tmp_path):
    final = tmp_path / "out" / "x.pt"             # the folder is created
    with AtomicPath(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(TEMP_PREFIX) and tmp.name.endswith("-x.pt")
        torch.save({"a": torch.arange(3)}, tmp)
        assert not final.exists()                 # nothing under the final name until the block ends
    assert torch.equal(torch.load(final, weights_only=True)["a"], torch.arange(3))
    with AtomicPath(final) as tmp:               # an existing file is replaced
        tmp.write_text("new")
    assert final.read_text() == "new" and os.listdir(final.parent) == ["x.pt"]


def test_exception_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    final = tmp_path / "x.json"
    final.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), AtomicPath(final) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk full")
    assert final.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(KeyboardInterrupt), AtomicPath(tmp_path / "y.json"):
        raise KeyboardInterrupt                  # nothing written yet: nothing to delete, no new file
    assert os.listdir(tmp_path) == ["x.json"]


def test_temps_are_unique_and_stale_ones_are_removed_by_name(tmp_path):
    a, b = AtomicPath(tmp_path / "00001.pt"), AtomicPath(tmp_path / "00001.pt")
    other = AtomicPath(tmp_path / "100001.pt")  # its name ends like 00001.pt's: must not be taken for it
    assert a.tmp != b.tmp                        # two writers of one name never share a temporary
    for target in (a, b, other):
        target.tmp.write_bytes(b"left by a killed writer")
    (tmp_path / "00002.pt").write_bytes(b"done")
    assert is_temp(a.tmp) and not is_temp(tmp_path / "00002.pt")
    assert remove_stale_temps(tmp_path, [str(tmp_path / "00001.pt")]) == 2   # only the named file's temporaries
    assert sorted(os.listdir(tmp_path)) == sorted([other.tmp.name, "00002.pt"])
    assert remove_stale_temps(tmp_path) == 1
    assert os.listdir(tmp_path) == ["00002.pt"]


def test_temporaries_of_earlier_writers_are_always_stale(tmp_path):
    """Names the writers before utils.io used (mp4, latents, ODE files): no writer makes them now, so they are removed
    whatever final names are asked for; finished files of similar names stay."""
    legacy = [".tmp_0123456789abcdef0123456789abcdef.mp4", ".a cat.latents.pt.tmp", "00003.pt.tmp"]
    kept = ["a cat.mp4", "a cat.latents.pt", "00003.pt", ".tmp_notes.mp4"]
    for name in legacy + kept:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temps(tmp_path, [str(tmp_path / "unrelated.mp4")]) == 3
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
