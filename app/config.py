"""``python -m app.config [CONFIG] [key=value ...]``: print a resolved config, or every default with its doc."""

import dataclasses
import sys
from typing import List, Optional

import yaml

from utils.config import COPIES, Config, config_to_yaml, load_config
from utils.config_compat import COMPAT_KEYS, SECRET_KEYS
from utils.errors import ConfigError


def describe_defaults() -> str:
    """Every key with its default and its one-line doc, as commented YAML."""
    lines: List[str] = []

    def emit(schema: type, indent: str) -> None:
        for f in dataclasses.fields(schema):
            lines.append(f"{indent}# {f.metadata.get('doc', '')}")
            if dataclasses.is_dataclass(f.type):
                lines.append(f"{indent}{f.name}:")
                emit(f.type, indent + "  ")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                lines.append(f"{indent}{f.name}: ???")
            else:
                value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                # Dumped inside a one-item flow list so lists stay on one line; the brackets are then cut off.
                text = yaml.safe_dump([value], allow_unicode=True, default_flow_style=True, width=10_000).strip()
                lines.append(f"{indent}{f.name}: {text[1:-1]}")

    emit(Config, "")
    copies = ", ".join(f"{key} (from {origin})" for key, (origin, _) in COPIES.items())
    lines.append(f"# Derived, accepted in a YAML only when equal to the derived value: {copies}")
    return "\n".join(lines + describe_compat()) + "\n"


def describe_compat() -> List[str]:
    """One comment line per compatibility key."""
    lines = ["# Accepted for published YAMLs, with no effect (utils/config_compat.py):"]
    for key, (allowed, why) in COMPAT_KEYS.items():
        only = f" (only {', '.join(map(repr, allowed))})" if allowed is not None else ""
        lines.append(f"#   {key}{only}: {why}")
    lines.append(f"# Ignored with a warning (export the variable instead): "
                 f"{', '.join(f'{k} -> {v}' for k, v in SECRET_KEYS.items())}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write("usage: python -m app.config [CONFIG.yaml [key=value ...]]\n")
        return 0
    try:
        text = _resolved(argv[0], argv[1:]) if argv else describe_defaults()
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stdout.write(text)
    return 0


def _resolved(path: str, overrides: List[str]) -> str:
    """The resolved config as YAML, with the derived pixel geometry as a closing comment."""
    cfg = load_config(path, overrides)
    return (config_to_yaml(cfg) + f"# derived from image_or_video_shape: height {cfg.height}, width {cfg.width}, "
            f"num_frames {cfg.num_frames}\n")


if __name__ == "__main__":
    sys.exit(main())
