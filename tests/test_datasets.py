"""Prompt and latent datasets and the resumable sampler."""

import pickle
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from utils.datasets import (
    LatentLMDBDataset,
    ODERegressionLMDBDataset,
    ResumableSampler,
    TextDataset,
)
from utils.errors import DataError
from utils.lmdb_store import LMDBWriter

ODE_ROW = (3, 2, 4, 4, 6)  # [S, F, C, H, W]


def write(path, text: str, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def make_lmdb(path, rows: int, row_shape, seed=0, prefix="p"):
    latents = np.random.default_rng(seed).standard_normal((rows, *row_shape)).astype(np.float16)
    prompts = [f"{prefix}{i}" for i in range(rows)]
    with LMDBWriter(path) as writer:
        writer.append(latents, prompts)
    return latents, prompts


# ------------------------------------------------------------------------------------------------ prompt files

def test_text_dataset_lines(tmp_path):
    path = write(tmp_path / "p.txt", "\ufeffa cat  \n\n   \nün chien\t\r\n猫 🐱\n")
    ds = TextDataset(path)
    assert len(ds) == 3
    assert [ds[i]["prompts"] for i in range(3)] == ["a cat", "ün chien", "猫 🐱"]
    assert ds[2] == {"prompts": "猫 🐱", "idx": 2}


def test_unicode_line_separators_stay_inside_a_prompt(tmp_path):
    """U+2028, U+2029, NEL and form feed are characters of a prompt, not line ends (str.splitlines splits at them);
    \r\n and a lone \r still end lines."""
    path = tmp_path / "p.txt"
    path.write_bytes("one\u2028two\u2029three\x85four\x0cfive\nsix\r\nseven\rnine\n".encode())
    ds = TextDataset(path)
    assert [ds[i]["prompts"] for i in range(len(ds))] == ["one\u2028two\u2029three\x85four\x0cfive", "six", "seven",
                                                          "nine"]


def test_text_dataset_tab_column(tmp_path):
    ds = TextDataset(write(tmp_path / "p.txt", "short\tthe long document\nno tab here\n"))
    assert ds[0] == {"prompts": "short", "idx": 0, "extended_prompts": "the long document"}
    assert ds[1]["extended_prompts"] == "no tab here"  # every item has the key, so batches collate
    with pytest.raises(DataError, match=r"p2.txt:1: empty prompt"):
        TextDataset(write(tmp_path / "p2.txt", "\tdocument only\n"))


def test_text_dataset_parallel_file(tmp_path):
    prompts = write(tmp_path / "p.txt", "a\nb\n")
    ds = TextDataset(prompts, write(tmp_path / "e.txt", "long a\n\nlong b\n"))
    assert [ds[i]["extended_prompts"] for i in range(2)] == ["long a", "long b"]
    with pytest.raises(DataError, match=r"has 2 prompts but .*short.txt has 1 extended"):
        TextDataset(prompts, write(tmp_path / "short.txt", "only one\n"))
    with pytest.raises(DataError, match="use one of them"):
        TextDataset(write(tmp_path / "tabs.txt", "a\tb\n"), tmp_path / "e.txt")


def test_missing_published_data_names_its_download(tmp_path):
    """The data a shipped config reads, missing: the one line carries the published README's commands that make it
    in that folder; any other missing path gets the plain line."""
    data = tmp_path / "dataset"
    get = f"get it with: hf download zhuhz22/Causal-Forcing-data --local-dir {data} && python utils/"
    with pytest.raises(DataError, match=re.escape(f"LMDB not found: {data / 'clean_data'}; {get}merge_and_get_clean.py "
                                                  f"--data_dir {data}")):
        LatentLMDBDataset(data / "clean_data")
    with pytest.raises(DataError, match=re.escape(f"; {get}merge_lmdb.py --data_dir {data}")):
        ODERegressionLMDBDataset(data / "ODE6KCausal_chunkwise")
    prompts = tmp_path / "vidprom_filtered_extended.txt"
    with pytest.raises(DataError, match=re.escape(f"prompt file not found: {prompts}; get it with: hf download "
                                                  f"gdhe17/Self-Forcing {prompts.name} --local-dir {tmp_path}")):
        TextDataset(prompts)
    with pytest.raises(DataError, match=f"LMDB not found: {re.escape(str(data / 'mine'))}$"):
        LatentLMDBDataset(data / "mine")


def test_text_dataset_file_errors(tmp_path):
    with pytest.raises(DataError, match="prompt file not found: .*missing.txt"):
        TextDataset(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="prompt file is empty: .*blank.txt"):
        TextDataset(write(tmp_path / "blank.txt", "\n  \n\t\n"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        TextDataset(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match="extended.txt"):
        TextDataset(write(tmp_path / "ok.txt", "a\n"), tmp_path / "extended.txt")


# ------------------------------------------------------------------------------------------------ LMDB datasets

def test_latent_dataset_rank5_rows_give_last_slot(tmp_path):
    latents, prompts = make_lmdb(tmp_path / "ode", 4, ODE_ROW)
    ds = LatentLMDBDataset(tmp_path / "ode")
    item = ds[2]
    assert len(ds) == 4 and item["prompts"] == prompts[2]
    assert item["clean_latent"].dtype == torch.float32 and item["clean_latent"].shape == ODE_ROW[1:]
    assert torch.equal(item["clean_latent"], torch.from_numpy(latents[2, -1].astype(np.float32)))
    assert len(LatentLMDBDataset(tmp_path / "ode", max_pair=2)) == 2
    with pytest.raises(IndexError):
        LatentLMDBDataset(tmp_path / "ode", max_pair=2)[2]


def test_latent_dataset_clean_rank4_and_shards(tmp_path):
    clean, _ = make_lmdb(tmp_path / "clean", 2, (1, *ODE_ROW[1:]))
    assert torch.equal(LatentLMDBDataset(tmp_path / "clean")[1]["clean_latent"], torch.from_numpy(
        clean[1, 0].astype(np.float32)))
    flat, _ = make_lmdb(tmp_path / "flat", 2, ODE_ROW[1:])
    assert torch.equal(LatentLMDBDataset(tmp_path / "flat")[0]["clean_latent"], torch.from_numpy(
        flat[0].astype(np.float32)))
    make_lmdb(tmp_path / "shards" / "part_0", 2, ODE_ROW, seed=1, prefix="a")
    make_lmdb(tmp_path / "shards" / "part_1", 3, ODE_ROW, seed=2, prefix="b")
    ds = LatentLMDBDataset(tmp_path / "shards")
    assert len(ds) == 5 and ds[2]["prompts"] == "b0"
    make_lmdb(tmp_path / "bad", 1, (2, 3))
    with pytest.raises(DataError, match="expected"):
        LatentLMDBDataset(tmp_path / "bad")


def test_ode_dataset_and_loader(tmp_path):
    latents, prompts = make_lmdb(tmp_path / "ode", 5, ODE_ROW)
    ds = ODERegressionLMDBDataset(tmp_path / "ode", max_pair=1e8)
    assert ds[4]["ode_latent"].shape == ODE_ROW and ds[4]["ode_latent"].dtype == torch.float32
    assert torch.equal(ds[4]["ode_latent"], torch.from_numpy(latents[4].astype(np.float32)))
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["ode_latent"].shape == (2, *ODE_ROW) and batch["prompts"] == prompts[:2]
    make_lmdb(tmp_path / "flat", 1, ODE_ROW[1:])
    with pytest.raises(DataError, match=r"\[S, F, C, H, W\]"):
        ODERegressionLMDBDataset(tmp_path / "flat")


def test_lmdb_dataset_in_forked_workers(tmp_path):
    """py-lmdb forbids a second open of a path in one process; workers inherit the parent's open env."""
    latents, _ = make_lmdb(tmp_path / "ode", 4, ODE_ROW)
    ds = ODERegressionLMDBDataset(tmp_path / "ode")
    ds[0]  # the parent has the environment open before the workers fork
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    out = torch.cat([b["ode_latent"] for b in loader])
    assert torch.equal(out, torch.from_numpy(latents.astype(np.float32)))
    assert pickle.loads(pickle.dumps(ds))[3]["prompts"] == "p3"  # spawn workers pickle the dataset


# ------------------------------------------------------------------------------------------------ sampling

def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def infinite(sampler):
    while True:
        yield from sampler


@pytest.mark.parametrize("cut", [0, 3, 7, 10, 11, 25])
def test_sampler_resume_equals_uninterrupted(cut):
    reference = take(infinite(ResumableSampler(10, seed=5)), 30)
    first = ResumableSampler(10, seed=5)
    head = take(infinite(first), cut)
    resumed = ResumableSampler(10, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + take(infinite(resumed), 30 - cut) == reference
    assert sorted(reference[:10]) == list(range(10)) and reference[:10] != reference[10:20]  # new epoch, new order


def test_sampler_resume_through_dataloader():
    """Pass after pass of one DataLoader: the sampler moves to its next epoch by itself."""
    ds = list(range(9))
    loader = DataLoader(ds, batch_size=2, sampler=ResumableSampler(9, seed=1))
    reference = [b.tolist() for b in take(infinite(loader), 12)]
    sampler = ResumableSampler(9, seed=1)
    head = [b.tolist() for b in take(infinite(DataLoader(ds, batch_size=2, sampler=sampler)), 5)]
    resumed = ResumableSampler(9, seed=1)
    resumed.load_state_dict(sampler.state_dict())
    tail = [b.tolist() for b in take(infinite(DataLoader(ds, batch_size=2, sampler=resumed)), 7)]
    assert head + tail == reference


@pytest.mark.parametrize("consumed", [0, 2, 3, 4, 8])
def test_sampler_state_for_equals_state_dict(consumed):
    """state_for(k) (a trainer's consumed count) resumes exactly like state_dict() after k items."""
    kwargs = dict(data_source=7, seed=3, num_replicas=2, rank=1)  # rank 1 gets 3 of the 7 samples per epoch
    live = ResumableSampler(**kwargs)
    take(infinite(live), consumed)
    from_state, from_count = ResumableSampler(**kwargs), ResumableSampler(**kwargs)
    from_state.load_state_dict(live.state_dict())
    from_count.load_state_dict(ResumableSampler(**kwargs).state_for(consumed))
    assert take(infinite(from_state), 8) == take(infinite(from_count), 8)


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (2, 4)])
def test_sampler_rank_split(n, world):
    """The uneven tail is dropped: every rank gets n // world distinct samples, no sample twice."""
    parts = [list(ResumableSampler(n, seed=0, num_replicas=world, rank=r)) for r in range(world)]
    assert [len(p) for p in parts] == [n // world] * world
    assert [len(ResumableSampler(n, num_replicas=world, rank=r)) for r in range(world)] == [n // world] * world
    assert len(set(sum(parts, []))) == (n // world) * world


def test_sampler_guards():
    sampler = ResumableSampler(5, seed=0)
    with pytest.raises(DataError, match="num_samples_total"):
        sampler.load_state_dict({**ResumableSampler(6).state_dict(), "epoch": 0, "position": 2})


class _BadRow(torch.utils.data.Dataset):
    """Row ``bad`` is broken, as a missing LMDB row would be."""

    def __init__(self, bad: int):
        self.bad = bad

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == self.bad:
            raise DataError(f"row {i} of array 'latents' missing in /data/x (incomplete build?)")
        return {"prompts": f"p{i}"}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_error_in_a_dataloader_worker_keeps_its_one_line(num_workers):
    """A DataError raised inside a worker reaches the loop as the same one-line DataError, not as torch's text
    with the worker's traceback."""
    from trainer.batches import ResumableBatches

    order = list(ResumableSampler(4))
    batches = ResumableBatches(_BadRow(order[2]), ResumableSampler(4), batch_size=1, num_workers=num_workers)
    assert next(batches)["prompts"] == [f"p{order[0]}"] and next(batches)["prompts"] == [f"p{order[1]}"]
    with pytest.raises(DataError) as err:
        next(batches)
    assert str(err.value) == f"row {order[2]} of array 'latents' missing in /data/x (incomplete build?)"
