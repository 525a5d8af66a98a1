"""The `atlasldm` command line (docs/cli.md): one entry point, help that lists every option with
its default and every config key from the dataclass schemas, `--print-config`, and one-line
errors with exit code 2 that write nothing.

The training and export commands end their process with `os._exit` (train/cli.py,
`end_process`), so their --help runs in a subprocess; the other commands run in this process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from atlasldm import cli, cli_schema
from atlasldm.train import classifier_stage, dit_stage, vae_stage
from atlasldm.train.cli import one_line_errors
from atlasldm.train.config import parse_stage_argv

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = {
    "train-vae": vae_stage.VAEStageConfig,
    "train-dit": dit_stage.DiTStageConfig,
    "train-classifier": classifier_stage.ClassifierTrainConfig,
}
ENDS_WITH_OS_EXIT = {*SCHEMAS, "export"}
# Every command's --help, plus the `run` subcommand behind bench-scale's default.
HELP_CALLS = [(name,) for name in cli.COMMANDS] + [("bench-scale", "run")]
NO_DEFAULT = {"-h, --help", "--version"}  # argparse's own actions: nothing to default


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, check=False
    )


def _atlasldm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`atlasldm ARGS` as a fresh process (the console script's `main`)."""
    return _run([sys.executable, "-m", "atlasldm.cli", *args], cwd)


def _in_process(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`atlasldm ARGS` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["atlasldm", *args])
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@functools.cache
def _help_subprocess(call: tuple[str, ...]) -> str:
    proc = _atlasldm(*call, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout[proc.stdout.index("usage: ") :]  # after DeepSpeed's CPU-accelerator line


def _help_text(call: tuple[str, ...], capsys, monkeypatch) -> str:
    if call[0] in ENDS_WITH_OS_EXIT:
        return _help_subprocess(call)
    code, out, err = _in_process([*call, "--help"], capsys, monkeypatch)
    assert code == 0, err
    return out


# --------------------------------------------------------------------------------------------
# Parsing argparse's help layout: "  -x, --xx X   help..." with continuation lines indented.
# --------------------------------------------------------------------------------------------


def _entries(help_text: str) -> list[tuple[str, str, str]]:
    """(section, invocation, help) of every argument argparse lists in `help_text`."""
    entries: list[list[str]] = []
    section = ""
    for line in help_text.splitlines():
        if line and not line.startswith(" "):
            section = line.rstrip(":") if line.endswith(":") else ""
        elif re.match(r"^  \S", line) and section:
            invocation, _, rest = line.strip().partition("  ")
            entries.append([section, invocation, rest.strip()])
        elif line.startswith("    ") and entries and entries[-1][0] == section:
            entries[-1][2] = f"{entries[-1][2]} {line.strip()}".strip()
    return [tuple(e) for e in entries]  # type: ignore[misc]


def _argument_problems(help_text: str) -> list[str]:
    """Options without help or without a shown default; positionals without help."""
    problems = []
    for section, invocation, text in _entries(help_text):
        if invocation.startswith("-") and invocation not in NO_DEFAULT:
            if not text:
                problems.append(f"{invocation}: no help text")
            elif not re.search(r"default|required", text, re.IGNORECASE):
                problems.append(f"{invocation}: help does not show the default ({text!r})")
        elif section == "positional arguments" and not text:
            problems.append(f"{invocation}: no help text")
    return problems


def test_the_help_parser_flags_a_bare_option():
    """The check below can fail: an option without help, or without its default, is caught."""
    text = (
        "usage: x\n\noptions:\n  -h, --help  show this help message and exit\n"
        "  --cells CELLS\n  --out OUT   where it goes\n  --seed SEED  the seed (default:\n"
        "              0)\n\npositional arguments:\n  FILE\n"
    )
    assert _argument_problems(text) == [
        "--cells CELLS: no help text",
        "--out OUT: help does not show the default ('where it goes')",
        "FILE: no help text",
    ]


@pytest.mark.parametrize("call", HELP_CALLS, ids=" ".join)
def test_every_option_has_help_and_shows_its_default(call, capsys, monkeypatch):
    text = _help_text(call, capsys, monkeypatch)
    assert text.startswith(f"usage: atlasldm {' '.join(call)}"), text[:200]
    assert _entries(text), "no options found in the help"
    assert _argument_problems(text) == []


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def _commands_listed(help_text: str) -> dict[str, str]:
    """Subcommand -> its help line, from the `commands:` section (indented 4, help after it or
    on the next lines)."""
    section = help_text.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]
    listed: dict[str, str] = {}
    name = ""
    for line in section.splitlines():
        if m := re.match(r"^    (\S+)(?:\s{2,}(.*))?$", line):
            name = m.group(1)
            listed[name] = (m.group(2) or "").strip()
        elif line.startswith("      ") and name:
            listed[name] = f"{listed[name]} {line.strip()}".strip()
    return listed


def test_help_lists_every_command_with_one_line(capsys, monkeypatch):
    code, out, _ = _in_process(["--help"], capsys, monkeypatch)
    assert code == 0
    listed = _commands_listed(out)
    assert set(listed) == set(cli.COMMANDS), listed
    assert all(listed.values()), listed


def test_version_is_the_package_version(capsys, monkeypatch):
    code, out, _ = _in_process(["--version"], capsys, monkeypatch)
    assert code == 0
    assert out.strip() == f"atlasldm {importlib.metadata.version('atlasldm')}"


@pytest.mark.parametrize("args", [[], ["trian-vae"], ["--verbose"]])
def test_a_missing_or_unknown_command_is_exit_2(args, capsys, monkeypatch):
    code, out, err = _in_process(args, capsys, monkeypatch)
    assert code == 2
    if args:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "atlasldm --help" in err
    else:
        assert "train-vae" in err  # the command list, to pick from


def test_each_command_runs_its_launchers_main(monkeypatch):
    """One code path: `atlasldm CMD ARGS` calls `atlasldm.launchers.<module>.main(ARGS)`."""
    seen = {}
    for name, (module, _) in cli.COMMANDS.items():
        launcher = importlib.import_module(f"atlasldm.launchers.{module}")
        monkeypatch.setattr(launcher, "main", lambda argv, name=name: seen.setdefault(name, argv))
        monkeypatch.setattr(sys, "argv", ["atlasldm"])
        assert cli.main([name, "a=1", "--flag"]) == 0
    assert seen == {name: ["a=1", "--flag"] for name in cli.COMMANDS}


def test_the_console_script_is_installed():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="atlasldm")
    assert script.value == "atlasldm.cli:main"
    proc = _run(["atlasldm", "--version"])
    assert proc.returncode == 0 and proc.stdout.startswith("atlasldm "), proc.stderr


# --------------------------------------------------------------------------------------------
# Training help: every config key, generated from the schema
# --------------------------------------------------------------------------------------------


def _leaves(schema: type, instance: object, prefix: str = "") -> dict[str, tuple[object, object]]:
    """Dotted key -> (resolved annotation, default) for every leaf field, recursively."""
    hints = typing.get_type_hints(schema)
    out = {}
    for fld in dataclasses.fields(schema):
        hint, value = hints[fld.name], getattr(instance, fld.name)
        if dataclasses.is_dataclass(hint):
            out |= _leaves(hint, value, f"{prefix}{fld.name}.")
        else:
            out[prefix + fld.name] = (hint, value)
    return out


def _key_lines(help_text: str) -> dict[str, tuple[str, str]]:
    """`  section.key (type, default: value)` lines -> (that line, the doc lines below it)."""
    lines = help_text.splitlines()
    found = {}
    for i, line in enumerate(lines):
        if m := re.match(r"^  ([a-z_]+(?:\.[a-z_0-9]+)+) \(", line):
            doc = []
            for nxt in lines[i + 1 :]:
                if not nxt.startswith("      "):
                    break
                doc.append(nxt.strip())
            found[m.group(1)] = (line, " ".join(doc))
    return found


def _as_written(value: object) -> str:
    """A scalar default as a key=value override or YAML would write it."""
    if isinstance(value, bool):
        return str(value).lower()
    return "''" if value == "" else str(value)


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_train_help_lists_every_field_of_every_section(command):
    schema = SCHEMAS[command]
    text = _help_subprocess((command,))
    listed = _key_lines(text)
    leaves = _leaves(schema, schema())
    assert set(leaves) == set(listed), sorted(set(leaves) ^ set(listed))
    for key, (hint, default) in leaves.items():
        line, doc = listed[key]
        assert doc, f"{key} has no doc line in --help"
        if hint in (int, float, str, bool):  # a scalar: its type and default as written
            assert line.endswith(f"({hint.__name__}, default: {_as_written(default)})"), line
    for section in {k.split(".")[0] for k in leaves}:
        assert re.search(rf"^{section}: \S", text, re.MULTILINE), f"no header for {section}"


def test_the_launcher_script_prints_the_same_help():
    proc = _run([sys.executable, str(REPO / "launchers" / "train_vae.py"), "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\nusage: train_vae.py " in f"\n{proc.stdout}"
    ours = _help_subprocess(("train-vae",))
    assert _key_lines(proc.stdout) == _key_lines(ours)


@pytest.mark.parametrize("schema", list(SCHEMAS.values()), ids=lambda s: s.__name__)
def test_every_config_field_has_a_doc(schema):
    undocumented = [k.name for k in cli_schema.config_keys(schema) if not k.doc]
    assert not undocumented, f"add a trailing `# doc` comment to: {undocumented}"
    assert all(doc for _, doc in cli_schema.sections(schema))


# A schema written for the doc reader: each way a field can carry (or lack) its doc.
@dataclass
class _Inner:
    """Inner section."""

    depth: int = 3  # levels deep
    # a block comment above the field,
    # over two lines
    width: float = 0.5
    mode: Literal["a", "b"] = "a"


@dataclass
class _Base:
    """Base schema."""

    inner: _Inner = field(default_factory=_Inner)
    steps: int = 10  # optimiser steps


@dataclass
class _Derived(_Base):
    """Derived schema."""

    inner: _Inner = field(
        default_factory=lambda: _Inner(depth=4)
    )  # overridden, doc on the closing line
    steps: int = 20
    bare: str = ""


def test_the_doc_reader_finds_each_comment_form():
    keys = {k.name: k for k in cli_schema.config_keys(_Derived)}
    assert keys["inner.depth"].doc == "levels deep"
    assert keys["inner.depth"].default == 4  # the overriding factory's value
    assert keys["inner.width"].doc == "a block comment above the field, over two lines"
    assert keys["inner.mode"].type == "{a,b}"
    assert keys["steps"].doc == "optimiser steps"  # inherited from the class it overrides
    assert keys["steps"].default == 20
    assert keys["bare"].doc == ""  # no comment: the schema test above would fail on it
    assert dict(cli_schema.sections(_Derived)) == {
        "inner": "Inner section — overridden, doc on the closing line"
    }


# --------------------------------------------------------------------------------------------
# --print-config and the argv of a training stage
# --------------------------------------------------------------------------------------------


def test_print_config_shows_the_override_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = vae_stage.main(["--print-config", "optim.lr=0.0123", "run.name=printed"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert metrics == {}
    assert printed["optim"]["lr"] == 0.0123 and printed["run"]["name"] == "printed"
    assert printed["batch"]["micro_cells"] == vae_stage.VAEStageConfig().batch.micro_cells
    assert not any(tmp_path.iterdir()), "--print-config wrote something"


def test_print_config_through_the_console_command(tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("run:\n  max_steps: 7\n")
    proc = _atlasldm("train-dit", str(yaml_file), "--print-config", "stage.denoiser=skip_mlp")
    assert proc.returncode == 0, proc.stderr[-2000:]
    try:  # `> config.yaml` must give a config file: nothing else on stdout
        printed = yaml.safe_load(proc.stdout)
    except yaml.YAMLError:
        printed = None
    assert isinstance(printed, dict), f"stdout is not only the config: {proc.stdout[:300]!r}"
    assert printed["run"]["max_steps"] == 7 and printed["stage"]["denoiser"] == "skip_mlp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]


_WORD = st.text("abcxyz", min_size=1, max_size=5)
_ARG = st.one_of(
    st.builds(lambda w: ("yaml", f"{w}.yaml"), _WORD),
    st.builds(lambda a, b: ("override", f"{a}.{b}={a}"), _WORD, _WORD),
    st.builds(lambda n: ("local_rank", f"--local_rank={n}"), st.integers(0, 7)),
    st.just(("print", "--print-config")),
)


@given(st.lists(_ARG, max_size=8))
def test_stage_argv_keeps_the_order_of_files_and_overrides(args):
    """Any interleaving: YAML files and overrides keep their order, --local_rank is dropped."""
    yamls, overrides, print_only = parse_stage_argv(_Derived, [a for _, a in args])
    assert yamls == [a for kind, a in args if kind == "yaml"]
    assert overrides == [a for kind, a in args if kind == "override"]
    assert print_only == any(kind == "print" for kind, _ in args)


# --------------------------------------------------------------------------------------------
# Mistakes: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------


def _one_line_exit_2(argv: list[str], capsys) -> str:
    """Run the VAE stage in this process as its launcher does; return the one error line."""
    with pytest.raises(SystemExit) as info, one_line_errors():
        vae_stage.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, (info.value.code, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


BAD_YAML = {
    "tab": ("run:\n  name: x\n\tseed: 1\n", "line 3: found a tab character"),
    "unclosed list": (
        "optim:\n  betas: [0.9, 0.95\nbatch: {}\n",
        "line 3: did not find expected ',' or ']' "
        "(while parsing a flow sequence started on line 2)",
    ),
    "duplicate key": ("run:\n  seed: 1\nrun:\n  seed: 2\n", "line 3: found duplicate key"),
    "top-level list": ("- run\n- optim\n", "the top level is a list"),
}


@pytest.mark.parametrize("name", BAD_YAML)
def test_a_yaml_mistake_names_the_file_and_line(name, tmp_path, capsys, monkeypatch):
    text, phrase = BAD_YAML[name]
    path = tmp_path / "x.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    err = _one_line_exit_2(["x.yaml", f"run.root={tmp_path / 'runs'}"], capsys)
    assert err.startswith("error: x.yaml") and phrase in err and "fix the YAML" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["x.yaml"]


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["optim.lrr=1"], "'optim.lrr'"),
        (["optim.lr=-1"], "optim.lr = -1.0 must be > 0"),
        (["precision.dtype=fp64"], "bad config value for 'precision.dtype': Invalid value 'fp64'"),
        (["run.seed=abc"], "'run.seed'"),
        (["data.source={missing}"], "does not exist"),
        (["optim.lr"], "needs the '='"),
        (["--optim.lr=1"], "unrecognized arguments: --optim.lr=1"),
    ],
)
def test_a_config_mistake_is_one_line_and_exit_2(argv, phrase, tmp_path, capsys):
    args = [a.format(missing=tmp_path / "missing") for a in argv]
    err = _one_line_exit_2([*args, f"run.root={tmp_path / 'runs'}"], capsys)
    assert phrase in err, err
    assert not any(tmp_path.iterdir()), "a mistake wrote something"


def test_the_real_process_exits_2_with_one_line(tmp_path):
    """Through the launcher script and `end_process`: exit status 2, one line, no traceback."""
    script = str(REPO / "launchers" / "train_vae.py")
    missing = f"data.source={tmp_path / 'missing'}"
    proc = _run([sys.executable, script, missing, f"run.root={tmp_path / 'runs'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not any(tmp_path.iterdir())


def test_export_usage_and_a_folder_that_is_no_run(tmp_path):
    help_text = _help_subprocess(("export",))
    assert "RUN_DIR" in help_text and "KEY=VALUE" in help_text
    proc = _atlasldm("export", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        f"error: {tmp_path} is not a run folder (no 'stage' file); give RUN_DIR of a trained run"
    )
    assert not any(tmp_path.iterdir())
