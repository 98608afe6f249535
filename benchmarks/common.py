"""What every inference benchmark writes next to its rows: the machine, the versions, the date, the command."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch


def save_results(path: str, rows: list[dict], device: torch.device, **extra) -> dict:
    """Write ``{"info": ..., "rows": rows}`` as JSON to ``path``, print the info line and return it."""
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), **extra)
    Path(path).write_text(json.dumps(dict(info=info, rows=rows), indent=2))
    print(json.dumps(info))
    return info
