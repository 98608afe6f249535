"""Dependencies are declared where they are imported (setup.py is the one list), and the repository's own files are
found from any working directory."""

import ast
import logging
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from utils.config import load_config
from utils.paths import _announce

REPO = Path(__file__).resolve().parent.parent
# Declared runtime dependencies that no import statement names: what they serve instead.
USED_WITHOUT_IMPORT = {"torch": "imported everywhere as torch (listed for the version floor)",
                       "protobuf": "transformers reads the UMT5 tokenizer's spiece.model through it"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(runtime, every) distribution names of setup.py: INSTALL_REQUIRES, and that plus every extra."""
    tree = ast.parse((REPO / "setup.py").read_text())
    runtime, every = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], (ast.Name, ast.Subscript)):
            names = {_normalise(re.match(r"[A-Za-z0-9_.-]+", c.value).group())
                     for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            every |= names
            if isinstance(node.targets[0], ast.Name) and node.targets[0].id == "INSTALL_REQUIRES":
                runtime |= names
    return runtime, every


def _third_party_imports() -> dict[str, str]:
    """Top-level module -> a file importing it, over every Python file of the repository (not ours, not stdlib)."""
    local = {p.stem for p in REPO.rglob("*.py")} | {p.name for p in REPO.iterdir() if p.is_dir()}
    found = {}
    for path in REPO.rglob("*.py"):
        if ".git" in path.parts or path.name == "setup.py":   # setuptools: pyproject.toml's build requirement
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared_and_every_runtime_dependency_is_imported():
    runtime, every = _declared()
    dists = packages_distributions()
    imported = set()
    for module, where in _third_party_imports().items():
        # an optional extra (wandb) need not be installed: then its module name is its distribution's name
        names = {_normalise(d) for d in dists.get(module, [module])}
        assert names & every, f"{module} (imported by {where}) is not declared in setup.py"
        imported |= names
    unused = runtime - imported - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared in INSTALL_REQUIRES but never imported: {sorted(unused)}"


def test_requirements_txt_installs_the_project_from_setup_py():
    lines = [line for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == ["-e .[test]"]


def test_ci_installs_as_the_readme_says():
    readme = (REPO / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## Test")]
    commands = re.findall(r"^python -m pip install .+$", install.split("```bash")[1].split("```")[0], re.M)
    ci = re.findall(r"^python -m pip install \S+(?: \S+)?", (REPO / ".ci" / "run").read_text(), re.M)
    assert commands == ci == ["python -m pip install torch==2.13.0", 'python -m pip install -e ".[test]"']


def test_shipped_config_and_its_paths_resolve_from_any_working_directory(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _announce.cache_clear()   # said once per path and process: an earlier test may have said it already
    with caplog.at_level(logging.INFO, logger="utils.paths"):
        cfg = load_config("configs/toy/causal_forcing_dmd_chunkwise.yaml")
    assert cfg.generator_ckpt == str(REPO / "assets/toy/checkpoints/chunkwise/causal_forcing.pt")
    assert cfg.wan_models_dir == str(REPO / "assets/toy")
    assert cfg.data_path == "dataset/toy/train_prompts.txt"         # not in the repository: as written
    assert "using the repository's" in caplog.text


def test_users_relative_paths_keep_their_meaning(tmp_path, monkeypatch):
    """A path that exists from the working directory wins; a user's YAML outside configs/ is never redirected."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets" / "toy").mkdir(parents=True)
    cfg = load_config(REPO / "configs/toy/causal_forcing_dmd_chunkwise.yaml")
    assert cfg.wan_models_dir == "assets/toy"                      # the working directory's folder
    own = tmp_path / "own.yaml"
    own.write_text("trainer: score_distillation\ngenerator_ckpt: assets/toy/checkpoints/chunkwise/causal_forcing.pt\n")
    assert load_config(own).generator_ckpt == "assets/toy/checkpoints/chunkwise/causal_forcing.pt"
