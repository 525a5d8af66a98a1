"""House rules that a reviewer would otherwise check by hand (docs/design.md, "Conventions")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "train", "evaluation", "generation", "pipeline")
# What each package may import from the project and from the distributed/tracking runtime.
FORBIDDEN = {
    "models": {
        "data",
        "train",
        "evaluation",
        "deepspeed",
        "wandb",
        "omegaconf",
        "torch.distributed",
    },
    "data": {"models", "train", "evaluation", "deepspeed", "wandb", "torch.distributed"},
    "evaluation": {"models", "data", "train", "deepspeed", "wandb", "torch.distributed"},
    # Generation needs only models and the exports; ranks come from train.distributed, lazily.
    "generation": {"data", "evaluation", "deepspeed", "wandb", "omegaconf", "torch.distributed"},
    "train": set(),
    "pipeline": set(),
}
DISTRIBUTED_MODULES = {"train/distributed.py", "train/checkpoint.py"}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Return every absolute module name imported by the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violates(name: str, forbidden: set[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules(package)
        for name in _imports(path)
        if _violates(name, FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_deepspeed_and_torch_distributed_live_in_two_modules() -> None:
    users = {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in _modules(package)
        if any(_violates(n, {"deepspeed", "torch.distributed"}) for n in _imports(path))
    }
    assert users <= DISTRIBUTED_MODULES, f"unexpected users: {sorted(users - DISTRIBUTED_MODULES)}"


def test_module_size_cap() -> None:
    files = [p for pkg in (*PACKAGES, "launchers") for p in _modules(pkg)]
    too_long = [
        f"{p.relative_to(ROOT)}: {len(p.read_text().splitlines())}"
        for p in files
        if len(p.read_text().splitlines()) > 500
    ]
    assert not too_long, f"modules over the 500-line cap: {too_long}"


def test_no_utils_modules() -> None:
    banned = {"utils.py", "common.py", "_utils.py", "helpers.py"}
    found = [
        str(p.relative_to(ROOT)) for pkg in PACKAGES for p in _modules(pkg) if p.name in banned
    ]
    assert not found, found


def test_configs_have_no_interpolation_or_targets() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "configs").rglob("*.yaml")
        if "${" in p.read_text() or "_target_" in p.read_text()
    ]
    assert not offenders, offenders


def test_launchers_run_nothing_at_import() -> None:
    """Each launcher defines main() and guards its call, so importing it has no side effects."""
    for path in sorted((ROOT / "launchers").glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
        assert not top, f"{path.name} calls code at import time"
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), (
            f"{path.name} has no main()"
        )
