"""Each command's ``--help`` shows the usage examples of its module docstring line by line, as written."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _module_docstrings():
    """``(path, source text of the module docstring)`` for every Python file of the repository."""
    for path in sorted(REPO.rglob("*.py")):
        if any(part.startswith(".") or part in ("output", "build") for part in path.relative_to(REPO).parts[:-1]):
            continue
        source = path.read_text(encoding="utf-8")
        body = ast.parse(source).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            yield path, ast.get_source_segment(source, body[0].value)


def test_docstrings_that_continue_a_command_with_a_backslash_are_raw():
    """In a plain string a backslash at a line's end joins the next line to it, indentation included, so the
    ``--help`` that prints the docstring would run an example command together into one line."""
    joined = [str(path.relative_to(REPO)) for path, text in _module_docstrings()
              if "\\\n" in text.replace("\\\\", "") and text[0] not in "rR"]
    assert not joined, f"module docstrings to write as r\"\"\"...\"\"\": {joined}"


def test_inference_help_shows_its_example_commands_line_by_line():
    out = subprocess.run([sys.executable, "inference.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=300).stdout
    assert "yaml \\\n        --checkpoint_path checkpoints/chunkwise/causal_forcing.pt" in out, out[:1500]
