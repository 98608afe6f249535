"""Torch datasets for prompts and latent LMDBs, and a resumable (distributed) sampler.

Prompt files: UTF-8, one prompt per line, trailing whitespace stripped, blank lines skipped. Extended (LLM-expanded)
prompts come as a second column ``prompt<TAB>extended`` (a line without a TAB uses its prompt) or as a parallel file."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils.errors import DataError
from utils.lmdb_store import LATENTS, PROMPTS, open_many
from utils.published_data import published_data_hint


def read_prompt_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """Non-blank lines of a UTF-8 prompt file (BOM ignored), right-stripped, as ``(line_number, text)``."""
    if not os.path.isfile(path):
        raise DataError(f"prompt file not found: {path}{published_data_hint(path)}")
    try:
        with open(path, encoding="utf-8-sig") as f:   # text mode: \r\n and \r arrive as \n
            # Lines end at \n only: str.splitlines() would also split at Unicode separators (U+2028, U+0085, \f ...)
            # inside a prompt, turning one prompt into two.
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise DataError(f"prompt file is not valid UTF-8: {path} (byte {err.start})") from None
    kept = [(n, line.rstrip()) for n, line in enumerate(lines, start=1) if line.strip()]
    if not kept:
        raise DataError(f"prompt file is empty: {path}")
    return kept


class TextDataset(Dataset):
    """Items ``{"prompts": str, "idx": int}``, plus ``"extended_prompts"`` when given (module docstring)."""

    def __init__(self, prompt_path: str | os.PathLike, extended_prompt_path: str | os.PathLike | None = None):
        self.prompts: list[str] = []
        self.extended_prompts: list[str] | None = None
        lines = read_prompt_lines(prompt_path)
        has_tabs = any("\t" in text for _, text in lines)
        if has_tabs and extended_prompt_path is not None:
            raise DataError(f"{prompt_path} has TAB-separated extended prompts and --extended_prompt_path "
                            f"{extended_prompt_path} was given too; use one of them")
        if has_tabs:
            self.extended_prompts = []
            for n, text in lines:
                prompt, _, extended = text.partition("\t")
                prompt, extended = prompt.rstrip(), extended.strip()
                if not prompt:
                    raise DataError(f"{prompt_path}:{n}: empty prompt before the TAB")
                self.prompts.append(prompt)
                self.extended_prompts.append(extended or prompt)
        else:
            self.prompts = [text for _, text in lines]
        if extended_prompt_path is not None:
            self.extended_prompts = [text for _, text in read_prompt_lines(extended_prompt_path)]
            if len(self.extended_prompts) != len(self.prompts):
                raise DataError(f"{prompt_path} has {len(self.prompts)} prompts but {extended_prompt_path} has "
                                f"{len(self.extended_prompts)} extended prompts; they must match line for line")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx: int) -> dict:
        item = {"prompts": self.prompts[idx], "idx": idx}
        if self.extended_prompts is not None:
            item["extended_prompts"] = self.extended_prompts[idx]
        return item


class LatentLMDBDataset(Dataset):
    """Items ``{"prompts": str, "clean_latent": float32 [F, C, H, W]}`` of one LMDB or a directory of shards, at most
    ``max_pair`` rows: rows ``[F, C, H, W]`` as stored, rows ``[S, F, C, H, W]`` (``clean_data`` with S = 1, or ODE
    trajectories ending in the ground truth) their last slot."""

    item_key, rows_name = "clean_latent", "latent"
    layouts = {4: "[F, C, H, W]", 5: "[S, F, C, H, W]"}   # accepted row ranks

    def __init__(self, data_path: str | os.PathLike, max_pair: int | float | None = None):
        if not os.path.exists(data_path):
            raise DataError(f"LMDB not found: {data_path}{published_data_hint(data_path)}")
        self.reader = open_many(data_path)
        self.row_shape = self.reader.shape(LATENTS)[1:]
        self._len = len(self.reader) if max_pair is None else min(len(self.reader), int(max_pair))
        if len(self.row_shape) not in self.layouts:
            raise DataError(f"{self.rows_name} rows in {data_path} have shape {self.row_shape}; expected "
                            f"{' or '.join(self.layouts.values())}")

    def __len__(self) -> int:
        return self._len

    def check_latent_shape(self, expected, key: str = "image_or_video_shape[1:]") -> None:
        """Refuse rows whose ``[F, C, H, W]`` is not ``expected`` (config ``key``): the networks accept any length,
        so a mismatch would silently train on other clips than configured."""
        found = tuple(int(s) for s in self.row_shape[-4:])
        if found != tuple(int(s) for s in expected):
            raise DataError(f"{self.reader.path}: latents are [F, C, H, W] = {list(found)} but the config's {key} is "
                            f"{list(expected)}; set it to the data's shape or use matching data")

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self._len:
            raise IndexError(f"index {idx} out of range for {self._len} samples")
        row = self._select(self.reader.get(LATENTS, idx))
        return {"prompts": self.reader.get(PROMPTS, idx), self.item_key: torch.from_numpy(row.astype(np.float32))}

    def _select(self, row: np.ndarray) -> np.ndarray:
        return row[-1] if row.ndim == 5 else row


class ODERegressionLMDBDataset(LatentLMDBDataset):
    """Items ``{"prompts": str, "ode_latent": float32 [S, F, C, H, W]}`` (the S slots: training.md §4.2)."""

    item_key, rows_name, layouts = "ode_latent", "ODE", {5: "[S, F, C, H, W]"}

    def _select(self, row: np.ndarray) -> np.ndarray:
        return row


class ResumableSampler(Sampler[int]):
    """Deterministic per-epoch permutation, split across ranks, resumable mid-epoch: epoch ``e`` permutes with
    ``numpy.random.default_rng([seed, e])``, drops the uneven tail so that ranks stay in step, and rank ``r`` of ``R``
    takes positions ``r, r + R, ...``. With DataLoader workers fetching ahead, save ``state_for(num_consumed)`` rather
    than ``state_dict()``."""

    def __init__(self, data_source, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.num_samples_total = data_source if isinstance(data_source, int) else len(data_source)
        self.seed, self.num_replicas, self.rank = int(seed), num_replicas, rank
        self.epoch, self.position = 0, 0
        self._start = (0, 0)  # (epoch, position) where the consumed-sample count of state_for() starts

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples_total)
        return order[: len(self) * self.num_replicas][self.rank::self.num_replicas]

    def __len__(self) -> int:
        """Samples of this rank per epoch."""
        return self.num_samples_total // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        if self.position >= len(self) > 0:  # state saved right after an epoch's last item
            self.epoch, self.position = self.epoch + 1, 0
        indices = self._epoch_indices(self.epoch)
        while self.position < len(indices):
            index = int(indices[self.position])
            self.position += 1
            yield index
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples_total": self.num_samples_total, "num_replicas": self.num_replicas}

    def state_for(self, num_consumed: int) -> dict:
        """State after this rank consumed ``num_consumed`` samples since this sampler was created or loaded."""
        per_epoch = len(self)
        if per_epoch == 0:
            return self.state_dict()
        absolute = self._start[0] * per_epoch + self._start[1] + num_consumed
        return {**self.state_dict(), "epoch": absolute // per_epoch, "position": absolute % per_epoch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples_total", "num_replicas"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"sampler state has {key}={state[key]} but this run has {getattr(self, key)}; "
                                f"the dataset or world size changed, cannot resume mid-epoch")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._start = (self.epoch, self.position)

