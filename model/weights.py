"""Where downloaded weights are expected, the command that fetches what is missing, and downloads on demand
(through ``huggingface_hub``; ``HF_HUB_OFFLINE=1`` / ``--offline``: none). Only file presence is checked (readers
report corrupt files)."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from pathlib import Path, PurePosixPath

from utils.errors import WeightsMissingError

log = logging.getLogger(__name__)

WAN_DIT_CONFIG = "config.json"
WAN_DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WAN_T5_FILENAME = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_SUBDIR = "google/umt5-xxl"
WAN_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")  # either one is enough for AutoTokenizer
WAN_TOKENIZER_DOWNLOAD = (*WAN_TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json")  # what the repo has
WAN_VAE_FILENAME = "Wan2.1_VAE.pth"
WAN_PARTS = ("dit", "text_encoder", "tokenizer", "vae")

WAN_ORG = "Wan-AI"
_WAN_REPO_RE = re.compile(r"^Wan2\.1-T2V-(1\.3B|14B)$")
CAUSAL_FORCING_REPO = "zhuhz22/Causal-Forcing"
# Every file of the zhuhz22/Causal-Forcing model repository (README.md lists each with its download command);
# `hf download <repo> <file> --local-dir checkpoints` puts it at checkpoints/<file>.
RELEASED_CHECKPOINTS = (
    "framewise/ar_diffusion.pt", "chunkwise/ar_diffusion.pt",            # Stage 1 (many-step)
    "framewise/causal_ode.pt", "chunkwise/causal_ode.pt",                # Stage 2a (4-step)
    "framewise/causal_cd.pt", "chunkwise/causal_cd.pt",                  # Stage 2b (4-step)
    "framewise/causal_forcing.pt", "chunkwise/causal_forcing.pt",        # Stage 3 (4-step)
    "causal-forcing++/framewise-2step.pt", "causal-forcing++/framewise-1step.pt",  # Stage 3, Causal Forcing++
    "chunkwise/longvideo.pt",                                             # the long-video (Rolling Forcing) model
)


def wan_repo_id(folder: str | Path) -> str | None:
    """``Wan-AI/<name>`` when the folder is named like a Wan2.1 T2V repository (1.3B or 14B), else None."""
    name = Path(folder).name
    return f"{WAN_ORG}/{name}" if _WAN_REPO_RE.match(name) else None


def wan_download_hint(folder: str | Path) -> str:
    """The command that fills ``folder``; a generic instruction when the repository cannot be told from its name."""
    repo_id = wan_repo_id(folder)
    local_dir = shlex.quote(str(folder))
    if repo_id is None:
        return (f"download the matching Wan2.1 repository into it, e.g. "
                f"hf download {WAN_ORG}/Wan2.1-T2V-1.3B --local-dir {local_dir}")
    return f"get them with: hf download {repo_id} --local-dir {local_dir}"


def shard_names(index: str | Path) -> list[str]:
    """The shard files a safetensors index lists, sorted, each once."""
    return sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))


def _dit_complete(folder: Path) -> bool:
    """config.json, and the single safetensors file or a readable index and every shard it lists."""
    index = folder / WAN_DIT_INDEX
    if not (folder / WAN_DIT_CONFIG).is_file() or not (index.is_file() or (folder / WAN_DIT_WEIGHTS).is_file()):
        return False
    try:
        return not index.is_file() or all((folder / shard).is_file() for shard in shard_names(index))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def missing_wan_parts(folder: str | Path, need: tuple[str, ...] = WAN_PARTS) -> list[str]:
    """The parts of ``need`` with files absent from ``folder`` (what a download fetches; each loader names its own
    missing file)."""
    folder = Path(folder)
    present = {"dit": _dit_complete(folder), "text_encoder": (folder / WAN_T5_FILENAME).is_file(),
               "tokenizer": any((folder / WAN_TOKENIZER_SUBDIR / name).is_file() for name in WAN_TOKENIZER_FILES),
               "vae": (folder / WAN_VAE_FILENAME).is_file()}
    return [part for part in need if not present[part]]


def download_hint_for_checkpoint(path: str | Path) -> str | None:
    """The ``hf download`` command for a released checkpoint path or Hub reference, else None."""
    hub = split_hub_file(path)
    if hub is not None and hub[0] == CAUSAL_FORCING_REPO:
        return f"hf download {hub[0]} {hub[1]}"          # a Hub reference: into the Hugging Face cache
    released = _released(path)
    if released is None:
        return None
    return f"hf download {CAUSAL_FORCING_REPO} {released[0]} --local-dir {shlex.quote(released[1])}"


def _released(path: str | Path) -> tuple[str, str] | None:
    """``(file in zhuhz22/Causal-Forcing, local folder it downloads into)`` for a released checkpoint's local path."""
    path = Path(path)
    filename = "/".join(path.parts[-2:])
    if len(path.parts) < 2 or filename not in RELEASED_CHECKPOINTS:
        return None
    return filename, path.parent.parent.as_posix() or "."


def check_file(path: str | Path, what: str, how_to_get: str | None = None) -> None:
    """Raise WeightsMissingError ``"<what> not found: <path>; get it with: <how_to_get>"`` unless ``path`` is a file
    (default: a released checkpoint's ``hf download`` command)."""
    path = Path(path)
    if path.is_file():
        return
    how_to_get = how_to_get or download_hint_for_checkpoint(path)
    hint = f"; get it with: {how_to_get}" if how_to_get else ""
    raise WeightsMissingError(f"{what} not found: {path}{hint}")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (``--offline`` sets it): nothing is downloaded, cached Hub files are still used."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def split_hub_file(ref: str | Path) -> tuple[str, str] | None:
    """``owner/repo/path/in/repo`` -> ``("owner/repo", "path/in/repo")`` when ``ref`` names no local path: relative,
    at least three parts, its first part not a local folder. None otherwise."""
    ref = str(ref)
    parts = PurePosixPath(ref).parts
    if len(parts) < 3 or ref.startswith((".", "/", "~")) or "\\" in ref or os.path.exists(parts[0]):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def _download(repo_id: str, filename: str, local_dir: str | None, what: str) -> str:
    """One file through ``hf_hub_download`` (its progress bar shows); offline, the cached copy or None."""
    from huggingface_hub import hf_hub_download

    offline = hub_offline()
    if not offline:
        log.info("downloading %s from the Hugging Face Hub (%s) into %s (HF_HUB_OFFLINE=1 or --offline: no "
                 "downloads)", filename, repo_id, local_dir or "the Hugging Face cache")
    try:
        return hf_hub_download(repo_id, filename, local_dir=local_dir, local_files_only=offline)
    except Exception as err:   # not found, no access, no network: one line; offline, a cache miss
        if offline:
            return None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightsMissingError(f"{what}: cannot download {filename} from the Hugging Face Hub repository "
                                  f"{repo_id} ({type(err).__name__}: {first})") from None


def resolve_checkpoint(path: str | Path, what: str = "checkpoint") -> str:
    """The local file for ``path``: itself when it exists, else a released checkpoint's usual path downloaded into its
    folder or a Hub reference into the Hugging Face cache; offline or otherwise ``path`` unchanged (the reader reports
    it missing, with its download command)."""
    path = str(path)
    if os.path.exists(path):
        return path
    hub = split_hub_file(path)
    released = None if hub is not None and hub[0] == CAUSAL_FORCING_REPO else _released(path)
    if released is not None:
        return path if hub_offline() else _download(CAUSAL_FORCING_REPO, released[0], released[1], f"{what} {path}")
    return path if hub is None else _download(hub[0], hub[1], None, f"{what} {path}") or path


def _wan_files(part: str, repo_id: str, local_dir: str | None) -> list[tuple[str, str | None]]:
    """Download one Wan part: ``[(name in the repository, local path or None offline), ...]``; the DiT is one file
    (1.3B) or an index and its shards (14B)."""
    def get(name: str) -> tuple[str, str | None]:
        return name, _download(repo_id, name, local_dir, f"Wan2.1 weights {repo_id}")

    if part != "dit":
        names = {"text_encoder": [WAN_T5_FILENAME], "vae": [WAN_VAE_FILENAME],
                 "tokenizer": [f"{WAN_TOKENIZER_SUBDIR}/{name}" for name in WAN_TOKENIZER_DOWNLOAD]}[part]
        return [get(name) for name in names]
    files = [get(WAN_DIT_CONFIG)]
    try:
        return files + [get(WAN_DIT_WEIGHTS)]
    except WeightsMissingError:   # not a single file: the sharded layout
        files.append(get(WAN_DIT_INDEX))
    index = files[-1][1]
    return files + [get(shard) for shard in (shard_names(index) if index else [])]


def resolve_wan_folder(models_dir: str | Path, name: str, need: tuple[str, ...] = WAN_PARTS) -> str:
    """The Wan2.1 folder ``models_dir/name`` with the parts ``need`` downloaded when missing: ``Wan2.1-T2V-1.3B`` /
    ``-14B`` completed in place, a Hub repository name without a local folder into the Hugging Face cache (its
    snapshot folder returned); otherwise (other names, diffusers folders, offline) the folder as it is."""
    folder = os.path.join(models_dir, name)
    if name.count("/") == 1 and not os.path.isdir(folder):
        repo_id, local_dir = name, None
    elif wan_repo_id(folder) and not os.path.isfile(os.path.join(folder, "model_index.json")):
        repo_id, local_dir = wan_repo_id(folder), folder
    else:
        return folder
    todo = list(need) if local_dir is None else missing_wan_parts(folder, need)
    if not todo or (local_dir is not None and hub_offline()):
        return folder
    files = [file for part in todo for file in _wan_files(part, repo_id, local_dir)]
    if local_dir is not None or any(path is None for _, path in files):
        return folder
    name, path = files[0]
    return path[: -len(name) - 1]   # the snapshot folder the repository's files lie in
