"""The package layout: one namespace, import directions, no cycles, sibling stages.

These are the rules of docs/design.md ("Layout") that a reviewer would otherwise check by hand.
Imports are read from the source with `ast`, function-level (lazy) imports included, so a cycle
cannot hide behind an import inside a function.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Top-level folder -> installed package (pyproject's [tool.setuptools.package-dir]).
FOLDERS = ("data", "models", "train", "evaluation", "generation", "pipeline", "bench", "launchers")
LIBRARY = ("data", "models", "train", "evaluation", "generation", "pipeline")
RUNTIME = {"deepspeed", "wandb", "torch.distributed"}


def _pkg(*names: str) -> set[str]:
    return {f"atlasldm.{n}" for n in names}


# What each folder may not import, from the project and from the distributed/tracking runtime.
FORBIDDEN = {
    "models": _pkg("data", "train", "evaluation", "generation", "pipeline", "bench")
    | RUNTIME
    | {"omegaconf"},
    "data": _pkg("models", "train", "evaluation", "generation", "pipeline", "bench") | RUNTIME,
    "evaluation": _pkg("models", "data", "train", "generation", "pipeline", "bench") | RUNTIME,
    # Generation needs only models and the exports; ranks come from train.distributed, lazily.
    "generation": _pkg("data", "evaluation", "pipeline", "bench") | RUNTIME | {"omegaconf"},
    "train": _pkg("evaluation", "generation", "pipeline", "bench"),
    "pipeline": _pkg("bench"),
    "bench": _pkg("pipeline"),
    "launchers": set(),
}
DISTRIBUTED_MODULES = {"train/distributed.py", "train/checkpoint.py"}
STAGE_MODULES = ("vae_stage", "dit_stage", "classifier_stage")


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    """`train/loop.py` -> `atlasldm.train.loop`; a package's `__init__.py` -> the package."""
    parts = ["atlasldm", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every absolute name the file imports, at module level or inside functions."""
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


def _import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (`from pkg import mod` counts as mod)."""
    paths = [p for folder in (*FOLDERS, "configs", "atlasldm") for p in _files(folder)]
    modules = {_module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        graph[name] = {n for n in _imports(path) if n in modules and n != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_folder_is_installed_under_the_namespace() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    expected = {f"atlasldm.{f}": f for f in (*FOLDERS, "configs")}
    expected.update({"atlasldm": "atlasldm"})
    for sub in (ROOT / "configs").rglob("*"):
        if sub.is_dir() and any(sub.glob("*.yaml")):
            rel = sub.relative_to(ROOT)
            expected[f"atlasldm.{'.'.join(rel.parts)}"] = str(rel)
    assert mapping == expected
    assert sorted(setuptools["packages"]) == sorted(expected)
    for folder in expected.values():
        assert (ROOT / folder / "__init__.py").is_file(), f"{folder}/ has no __init__.py"


def test_no_generic_top_level_imports() -> None:
    """Only `atlasldm.…` names: a bare `train` or `models` would be the user's own module."""
    bare = {f for f in (*FOLDERS, "configs")}
    files = [p for f in (*FOLDERS, "configs", "atlasldm", "tests") for p in _files(f)]
    bad = [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in files
        for name in _imports(p)
        if name.split(".")[0] in bare
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", FOLDERS)
def test_import_direction(folder: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _files(folder)
        for name in _imports(path)
        if _violates(name, FORBIDDEN[folder])
    ]
    assert not bad, "\n".join(bad)


def test_the_direction_rules_see_project_imports() -> None:
    """The rules above match real import names (a rename of the namespace would void them)."""
    graph = _import_graph()
    assert "atlasldm.models.vae" in graph["atlasldm.train.vae_stage"]
    assert _violates("atlasldm.train.loop", FORBIDDEN["models"])


def test_no_import_cycles_anywhere() -> None:
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_lazy_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_stages_are_siblings() -> None:
    """No stage module imports another; what stages share lives in modules no stage owns."""
    stages = {f"atlasldm.train.{s}" for s in STAGE_MODULES}
    graph = _import_graph()
    assert stages <= set(graph), sorted(stages - set(graph))
    bad = {s: sorted(graph[s] & stages) for s in stages if graph[s] & stages}
    assert not bad, bad
    stage_contract = graph["atlasldm.train.stage"]
    assert not {m for m in stage_contract if m.startswith("atlasldm.train.")} - {
        "atlasldm.train.config"
    }, f"train/stage.py is the contract only; it imports {sorted(stage_contract)}"


def test_deepspeed_and_torch_distributed_live_in_two_modules() -> None:
    users = {
        str(path.relative_to(ROOT))
        for folder in LIBRARY
        for path in _files(folder)
        if any(_violates(n, {"deepspeed", "torch.distributed"}) for n in _imports(path))
    }
    assert users <= DISTRIBUTED_MODULES, f"unexpected users: {sorted(users - DISTRIBUTED_MODULES)}"


def test_no_utils_modules() -> None:
    banned = {"utils.py", "common.py", "_utils.py", "helpers.py"}
    found = [str(p.relative_to(ROOT)) for f in FOLDERS for p in _files(f) if p.name in banned]
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
