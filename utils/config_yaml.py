"""Reading the layers of a config (YAML files with their ``base:`` chains, ``key=value`` overrides) and the one-line
messages for an unknown key or a mistyped value; :func:`utils.config.load_config` merges them into its schema."""

import dataclasses
import difflib
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.config_compat import BASE_KEY, KEY_HINTS, SECRET_KEYS, is_published
from utils.errors import ConfigError
from utils.paths import CONFIGS_DIR, resolve_shipped_paths


def find_default_config(path: Path) -> Optional[Path]:
    """default_config.yaml beside the given file, else the repository's ``configs/`` one, else none."""
    for folder in (path.parent, CONFIGS_DIR):
        candidate = folder / "default_config.yaml"
        if candidate.is_file():
            return candidate
    return None


def read_chain(path: Path, seen: Tuple[Path, ...]) -> List[Tuple[str, DictConfig, bool]]:
    """``[(source, node, published), ...]`` for ``path`` and its ``base:`` ancestors, outermost ancestor first."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: '{BASE_KEY}:' chain loops back to this file")
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:  # syntax errors and duplicate keys carry a position
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise ConfigError(f"{path}: cannot parse YAML: {e.problem}{where}") from None
    except Exception as e:
        raise ConfigError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    published = is_published(node)
    resolve_shipped_paths(node, path)
    chain: List[Tuple[str, DictConfig, bool]] = []
    if BASE_KEY in node:
        base = node.pop(BASE_KEY)
        if not isinstance(base, str):
            raise ConfigError(f"{path}: '{BASE_KEY}' must be a path to another YAML, got {base!r}")
        if not (path.parent / base).is_file():
            raise ConfigError(f"{path}: base config {path.parent / base} not found")
        chain = read_chain(path.parent / base, seen + (path.resolve(),))
    return chain + [(str(path), node, published)]


def read_override(item: str) -> Tuple[str, DictConfig, bool]:
    """One ``key=value`` override as a layer. A secret's value is neither parsed nor shown."""
    key = item.split("=", 1)[0].strip()
    if key in SECRET_KEYS:
        return f"override '{key}=...'", OmegaConf.create({key: None}), False
    source = f"override {item!r}"
    if "=" not in item or key == BASE_KEY:
        raise ConfigError(f"{source}: expected key=value with a config key")
    try:
        return source, OmegaConf.from_dotlist([item]), False
    except Exception as e:  # OmegaConf grammar or YAML errors; the first line says what
        raise ConfigError(f"{source}: cannot parse: {str(e).splitlines()[0]}") from None


def check_keys(node: DictConfig, schema: type, source: str, prefix: str = "") -> None:
    """Raise on a key of ``node`` (nested ones too) that the schema does not have."""
    names = [f.name for f in dataclasses.fields(schema)]
    hints = get_type_hints(schema)
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{full}'{_suggest(str(key), names, prefix)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            check_keys(node[key], hints[key], source, prefix=f"{full}.")


def _suggest(key: str, names: List[str], prefix: str) -> str:
    hints = {} if prefix else KEY_HINTS
    match = difflib.get_close_matches(key, names + list(hints), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{hints.get(match[0], match[0])}'?)" if match else ""


def describe_type_error(e: OmegaConfBaseException, schema: type) -> str:
    """One line for an OmegaConf type error: the key, what it expects, what it got."""
    full_key = str(getattr(e, "full_key", "") or "")
    expected = _expected_type(full_key, schema)
    value = getattr(e, "value", None)
    if expected and full_key:
        return f"key '{full_key}' expects {expected}, got {value!r}"
    return str(e).splitlines()[0]


def _expected_type(full_key: str, schema: Any) -> str:
    """Readable type of a schema field given its dotted key (list indices ignored); '' if unknown."""
    annotation: Any = None
    for part in full_key.split("[")[0].split("."):
        if not dataclasses.is_dataclass(schema):
            return ""
        annotation = get_type_hints(schema).get(part)
        if annotation is None:
            return ""
        schema = annotation
    return _type_name(annotation)


def _type_name(annotation: Any) -> str:
    args = get_args(annotation)
    if get_origin(annotation) is Union and type(None) in args:
        return _type_name(next(a for a in args if a is not type(None))) + " or null"
    if get_origin(annotation) in (list, List):
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    names = {bool: "a boolean", int: "an int", float: "a float", str: "a string"}
    return names.get(annotation, f"a {getattr(annotation, '__name__', annotation)} mapping")
