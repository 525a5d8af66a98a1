"""Size and shape rules of the code (docs/design.md, "Conventions"), as the formatter leaves it.

`# fmt: skip` may keep a table literal laid out by hand, nothing else, so that the size caps hold
for the code as `ruff format` writes it.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("data", "models", "train", "evaluation", "generation", "pipeline", "bench", "launchers")
MODULE_LINES = 500
FUNCTION_LINES = 60
# The training loop and the stages pass one run-state object, not the pieces of one.
FEW_PARAMETERS = ("train",)
MAX_PARAMETERS = 4
TABLES = (ast.Dict, ast.List, ast.Tuple, ast.Set)


def _files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    return [n for n in ast.walk(tree) if isinstance(n, kinds)]


def _fmt_skip_lines(source: str) -> list[int]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [t.start[0] for t in tokens if t.type == tokenize.COMMENT and "fmt: skip" in t.string]


def _is_table(tree: ast.AST, line: int) -> bool:
    """Whether the statement ending on `line` assigns a literal container (a table)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.end_lineno == line:
            return isinstance(node.value, TABLES)
    return False


def test_module_size_cap() -> None:
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in _files(*CODE)
        if (n := len(p.read_text().splitlines())) > MODULE_LINES
    }
    assert not too_long, f"modules over {MODULE_LINES} lines: {too_long}"


@pytest.mark.parametrize("folder", [*CODE, "tests"])
def test_function_size_cap(folder: str) -> None:
    too_long = [
        f"{p.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for p in _files(folder)
        for fn in _functions(p)
        if fn.end_lineno - fn.lineno + 1 > FUNCTION_LINES
    ]
    assert not too_long, "\n".join(too_long)


@pytest.mark.parametrize("folder", [*CODE, "tests"])
def test_fmt_skip_only_keeps_tables(folder: str) -> None:
    bad = []
    for path in _files(folder):
        source = path.read_text()
        tree = ast.parse(source)
        bad += [
            f"{path.relative_to(ROOT)}:{line}"
            for line in _fmt_skip_lines(source)
            if not _is_table(tree, line)
        ]
    assert not bad, "`# fmt: skip` on something other than a table:\n" + "\n".join(bad)


def test_the_table_rule_tells_tables_from_code() -> None:
    source = 'ROWS = [\n    ("a", 1),  ("bb", 22),\n]  # fmt: skip\nf(1,  2)  # fmt: skip\n'
    tree = ast.parse(source)
    assert _fmt_skip_lines(source) == [3, 4]
    assert _is_table(tree, 3) and not _is_table(tree, 4)


def test_few_parameters_in_the_training_code() -> None:
    crowded = []
    for path in _files(*FEW_PARAMETERS):
        for fn in _functions(path):
            args = fn.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            names = [n for n in names if n not in ("self", "cls")]
            if len(names) > MAX_PARAMETERS:
                crowded.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}({len(names)})")
    assert not crowded, f"over {MAX_PARAMETERS} parameters:\n" + "\n".join(crowded)
