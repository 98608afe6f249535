"""Resumable per-rank batches: :class:`ResumableBatches` counts the samples it handed out, so a resumed run continues
at the next unconsumed one whatever the DataLoader workers had prefetched."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.datasets import ResumableSampler
from utils.errors import DataError, UserError


class GlobalStreamSampler(Sampler[int]):
    """Rank ``r``'s share of ONE endless sample stream that does not depend on the world size: per-epoch permutations
    (``numpy.random.default_rng([seed, e])``) end to end, rank ``r`` of ``R`` taking positions ``r, r + R, ...``, so
    step ``s`` of ``total_batch_size = T`` consumes ``[s*T, (s+1)*T)`` however it is split. The state is the global
    position (ranks consume in lockstep), so it resumes on any world size."""

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.num_samples_total, self.seed = int(num_samples), int(seed)
        self.num_replicas, self.rank = num_replicas, rank
        self.start = 0                                  # global position where this rank's count starts
        self._epoch, self._order = -1, np.arange(0)     # cached permutation of one epoch

    def index_at(self, position: int) -> int:
        """Dataset index at global stream ``position``."""
        epoch, offset = divmod(position, self.num_samples_total)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples_total)
            self._epoch = epoch
        return int(self._order[offset])

    def position_of(self, consumed: int) -> int:
        """Global position of this rank's ``consumed``-th sample (0-based) since the start / the loaded state."""
        return self.start + consumed * self.num_replicas + self.rank

    def keyed(self) -> Iterator[tuple[int, int]]:
        """This rank's stream as ``(dataset index, global position)`` pairs."""
        consumed = 0
        while True:
            position = self.position_of(consumed)
            yield self.index_at(position), position
            consumed += 1

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.keyed())

    def state_for(self, num_consumed: int) -> dict:
        """State after this rank consumed ``num_consumed`` samples since the sampler was created or loaded."""
        return {"position": self.start + num_consumed * self.num_replicas, "seed": self.seed,
                "num_samples_total": self.num_samples_total, "world_size_independent": True}

    def state_dict(self) -> dict:
        return self.state_for(0)

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples_total"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise DataError(f"data state has {key}={state[key]} but this run has {getattr(self, key)}; "
                                f"the dataset or seed changed, cannot resume at the same sample")
        if "position" not in state:
            raise DataError("data state has no global 'position': it was written by the per-rank sampler of an "
                            "older version; start a new --logdir")
        self.start = int(state["position"])


class IndexBatches:
    """Batches of sample indices forever (``keyed``: ``(index, global position)`` pairs of a
    :class:`GlobalStreamSampler`); a batch may straddle two epochs (nothing dropped or repeated), so the count of
    consumed samples alone locates the run in the sampler."""

    def __init__(self, sampler: ResumableSampler | GlobalStreamSampler, batch_size: int, keyed: bool = False):
        self.sampler, self.batch_size, self.keyed = sampler, batch_size, keyed

    def __iter__(self) -> Iterator[list]:
        batch: list = []
        while True:
            # the rest of the current epoch, then the sampler moves to the next
            for index in (self.sampler.keyed() if self.keyed else self.sampler):
                batch.append(index)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []


class KeyedSamples(Dataset):
    """``dataset`` read at ``(index, global position)``: the item, its ``sample_id`` (the position) and, with
    ``per_sample``, what ``per_sample(item, position)`` adds to it (run where the item is read: in a DataLoader
    worker, off the training process; it must pickle)."""

    def __init__(self, dataset, per_sample: Callable[[dict, int], dict] | None = None):
        self.dataset, self.per_sample = dataset, per_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        item = dict(self.dataset[index], sample_id=position)
        return {**item, **self.per_sample(item, position)} if self.per_sample is not None else item


class ResumableBatches:
    """Infinite iterator of collated batches with a resumable position; with a :class:`GlobalStreamSampler` each batch
    carries ``sample_id`` (int64 ``[B]`` stream positions, the key of per-sample draws) and what ``per_sample`` makes
    of each sample (:class:`KeyedSamples`)."""

    def __init__(self, dataset, sampler: ResumableSampler | GlobalStreamSampler, batch_size: int, num_workers: int,
                 per_sample: Callable[[dict, int], dict] | None = None):
        self.keyed = isinstance(sampler, GlobalStreamSampler)
        if per_sample is not None and not self.keyed:
            raise ValueError("per_sample needs a GlobalStreamSampler: it is keyed by the global stream position")
        self.dataset = KeyedSamples(dataset, per_sample) if self.keyed else dataset
        self.sampler, self.batch_size, self.num_workers = sampler, batch_size, num_workers
        self.consumed = 0   # samples handed out since the sampler was created or loaded
        self._iterator = None

    def __iter__(self) -> "ResumableBatches":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            # Its own generator: otherwise iter() draws the workers' base seed from the global torch RNG, which a
            # resumed run has just restored, and the first step after a resume would see other noise.
            loader = DataLoader(self.dataset, batch_sampler=IndexBatches(self.sampler, self.batch_size, self.keyed),
                                num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                                generator=self._loader_generator())
            self._iterator = iter(loader)
        try:
            batch = next(self._iterator)
        except UserError as err:   # raised in a worker: torch re-raises it with the worker's traceback as its text
            raise type(err)(_worker_message(err)) from None
        self.consumed += len(batch["prompts"])
        return batch

    def _loader_generator(self) -> torch.Generator:
        """A generator seeded by the run's seed and the data position the loader starts at."""
        position = self.sampler.state_for(self.consumed)
        words = [self.sampler.seed, *(int(position[k]) for k in ("epoch", "position") if k in position)]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]))

    def state_dict(self) -> dict:
        state = {"sampler": self.sampler.state_for(self.consumed)}
        if isinstance(self.sampler, GlobalStreamSampler):
            state["world_size_independent"] = True   # utils/checkpoint.py restores it on any world size
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.consumed = 0
        self._iterator = None  # prefetched batches belong to the old position; workers shut down with it


def _worker_message(err: Exception) -> str:
    """The one-line message of an error a DataLoader worker raised (torch re-raises it with the worker's traceback:
    ``"Caught DataError in ...\nutils.errors.DataError: <message>"``)."""
    text = str(err)
    if not text.startswith("Caught "):
        return text
    last = text.rstrip().splitlines()[-1]
    for name in (f"{type(err).__module__}.{type(err).__qualname__}: ", f"{type(err).__qualname__}: "):
        if last.startswith(name):
            return last[len(name):]
    return last


class DataPosition:
    """An objective's :class:`ResumableBatches`, or the saved position loaded before they are built."""

    def __init__(self):
        self.batches: ResumableBatches | None = None
        self._pending: dict | None = None

    def attach(self, batches: ResumableBatches) -> ResumableBatches:
        self.batches = batches
        if self._pending is not None:
            batches.load_state_dict(self._pending)
            self._pending = None
        return batches

    def state_dict(self) -> dict:
        return dict(self._pending or {}) if self.batches is None else self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.batches is None:
            self._pending = dict(state)
        else:
            self.batches.load_state_dict(state)
