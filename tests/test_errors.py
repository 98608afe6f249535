"""The one report of a strict state-dict load that does not fit (utils/errors.py), used by every loader."""

import pytest
import torch
import torch.nn as nn

from utils.ema import ShardLocalEMA
from utils.errors import key_mismatch, state_dict_mismatch


def test_key_mismatch_is_one_line_with_counts_and_first_names():
    names = [f"blocks.{i}.w" for i in range(10)]
    assert key_mismatch(names[:2], ["extra"]) == "missing keys (2): blocks.0.w, blocks.1.w; unexpected keys (1): extra"
    assert key_mismatch(names) == "missing keys (10): " + ", ".join(names[:8]) + ", ..."
    assert key_mismatch(unexpected={"b", "a"}, limit=1) == "unexpected keys (2): a, ..."   # sets are sorted
    assert key_mismatch() == ""


def test_state_dict_mismatch_names_missing_unexpected_and_shapes():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    given = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)}
    report = state_dict_mismatch(expected, given)
    assert report == ("missing keys (1): c; unexpected keys (1): d; "
                      "shape mismatches (1): b: checkpoint (4,) vs model (3,)")
    assert state_dict_mismatch(expected, expected) == ""


def test_ema_reports_through_the_same_function():
    ema = ShardLocalEMA(nn.Linear(2, 2), 0.9)
    with pytest.raises(KeyError, match=r"missing keys \(1\): weight; unexpected keys \(1\): w'"):
        ema.load_state_dict({"bias": torch.zeros(2), "w": torch.zeros(2, 2)})
    with pytest.raises(KeyError, match=r"missing keys \(2\): bias, weight"):
        ema.copy_to(nn.Sequential(nn.Linear(2, 2)))
