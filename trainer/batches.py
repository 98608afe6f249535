"""Resumable per-rank batches for the training objectives.

:class:`ResumableBatches` turns a dataset and a :class:`~utils.datasets.ResumableSampler` into an infinite iterator of
collated batches whose ``state_dict`` records how many samples were handed out, so a resumed run continues at the
next unconsumed sample whatever the DataLoader workers had prefetched.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from utils.datasets import ResumableSampler


class IndexBatches:
    """Batches of sample indices from a :class:`ResumableSampler`, forever, across epoch boundaries.

    A batch may straddle two epochs, so no sample is dropped or repeated at an epoch's end and the count of consumed
    samples alone locates the run in the sampler (``ResumableSampler.state_for``).
    """

    def __init__(self, sampler: ResumableSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        while True:
            for index in self.sampler:  # the rest of the current epoch, then the sampler moves to the next
                batch.append(index)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []


class ResumableBatches:
    """Infinite iterator of collated batches with a resumable position (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, dataset, sampler: ResumableSampler, batch_size: int, num_workers: int):
        self.dataset, self.sampler, self.batch_size, self.num_workers = dataset, sampler, batch_size, num_workers
        self.consumed = 0   # samples handed out since the sampler was created or loaded
        self._iterator = None

    def __iter__(self) -> "ResumableBatches":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            # Workers fetch indices ahead of use; state_dict() therefore counts consumed samples, not fetched ones.
            loader = DataLoader(self.dataset, batch_sampler=IndexBatches(self.sampler, self.batch_size),
                                num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
            self._iterator = iter(loader)
        batch = next(self._iterator)
        self.consumed += len(batch["prompts"])
        return batch

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_for(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.consumed = 0
        self._iterator = None  # prefetched batches belong to the old position; workers shut down with it
