"""The house rules, checked on the source: layers import only downwards, and importing library code never edits
sys.path (a script kept at a published path, ``python utils/merge_lmdb.py``, may in its ``__main__`` guard).

Every import statement counts, lazy ones inside functions included (they run up a floor just the same).
Floors: ``utils`` < ``model`` < ``pipeline`` < ``trainer``; the apps (``app``, the entry scripts) and the toy world
(``toy``) sit outside and above, and nothing in the four library packages imports them, nor ``benchmarks`` or
``tests``. Relative imports are resolved against the importing module's package.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"utils": 0, "model": 1, "pipeline": 2, "trainer": 3}
OUTSIDE = {"app", "toy", "web", "benchmarks", "scripts", "tests", "train", "inference", "demo",
           "get_causal_ode_data"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import statement in ``path``."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return found


def violations(top: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / top).rglob("*.py")):
        for line, module in imported_modules(path):
            head = module.split(".")[0]
            if head in OUTSIDE or (head in FLOORS and FLOORS[head] > FLOORS[top]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("top", sorted(FLOORS))
def test_library_layers_import_only_downwards(top):
    assert violations(top) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The walker must catch an import inside a function body and a relative import that climbs out of a package."""
    fake = tmp_path / "model"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from pipeline.causal import BlockLoop\n    from ..toy import world\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("model") == ["model/x.py:2 imports pipeline.causal", "model/x.py:3 imports toy"]


def _main_guard(node: ast.stmt) -> bool:
    """A module-level ``if __name__ == "__main__" ...:``: its body runs only when the file is run as a script."""
    return isinstance(node, ast.If) and any(isinstance(n, ast.Constant) and n.value == "__main__"
                                            for n in ast.walk(node.test))


def sys_path_edits(path: Path) -> list[int]:
    """Lines of ``path`` that call a method of ``sys.path`` or assign to an item or slice of it, outside a
    module-level ``__main__`` guard."""
    module = ast.parse(path.read_text(encoding="utf-8"))
    lines = []
    for top_node in (n for n in module.body if not _main_guard(n)):
        for node in ast.walk(top_node):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if isinstance(node, ast.Assign):
                target = next((t.value for t in node.targets if isinstance(t, ast.Subscript)), None)
            if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", "") == "sys":
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("top", sorted(FLOORS))
def test_library_code_does_not_edit_sys_path(top):
    edits = [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / top).rglob("*.py"))
             for line in sys_path_edits(path)]
    assert edits == []


def test_the_sys_path_checker_spares_only_the_main_guard(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("import sys\n"
                      "if __name__ == '__main__' and not __package__:\n    sys.path[0] = 'here'\n"
                      "def f():\n    sys.path.insert(0, 'there')\n"
                      "if sys.platform:\n    sys.path[:] = []\n")
    assert sys_path_edits(source) == [5, 7]
