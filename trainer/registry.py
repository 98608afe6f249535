"""Stage objectives by ``cfg.trainer`` name, imported lazily (docs/training_loop.md "Adding a stage")."""

from __future__ import annotations

import importlib

from trainer.objective import Objective
from utils.config import Config

# cfg.trainer -> (module, class): the reference YAMLs' ``trainer`` values, which the config checks (TRAINERS).
OBJECTIVES: dict[str, tuple[str, str]] = {
    "diffusion": ("trainer.diffusion", "DiffusionObjective"),
    "ode": ("trainer.ode", "ODEObjective"),
    "consistency_distillation": ("trainer.consistency", "ConsistencyObjective"),
    "score_distillation": ("trainer.dmd", "DMDObjective"),
}


def build_objective(cfg: Config) -> Objective:
    """The objective named by ``cfg.trainer``, constructed from the config."""
    module, name = OBJECTIVES[cfg.trainer]
    return getattr(importlib.import_module(module), name)(cfg)
