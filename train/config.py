"""Typed run configuration: dataclass schema, overridden by YAML files, then `key=value` args.

Loading order (conventions.md §3): structured schema -> YAML files in the order given ->
`key=value` overrides -> `OmegaConf.to_object`. Unknown keys, wrong types and bad enum values
fail at load with a message that names the key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be loaded; the message names the key and the fix."""


def _check_literals(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError when a `Literal[...]` field holds a value outside its choices."""
    if not dataclasses.is_dataclass(obj):
        return
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        hint = hints.get(field.name)
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise ConfigError(
                f"config key '{prefix}{field.name}' = {value!r} is not one of {choices}; "
                f"set it to one of these"
            )
        _check_literals(value, f"{prefix}{field.name}.")


def load_config(
    schema: type[T], yaml_paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> T:
    """Return a `schema` instance built from its defaults, YAML files and `key=value` overrides.

    Raises:
        ConfigError: unknown key, wrong type, unreadable YAML, or a value outside a Literal.
    """
    try:
        cfg = OmegaConf.structured(schema)
        OmegaConf.set_struct(cfg, True)
        for path in yaml_paths:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist; check the path")
            text = path.read_text()
            if "${" in text or "_target_" in text:
                raise ConfigError(
                    f"{path}: interpolation ('${{') and '_target_' are not allowed in configs; "
                    "write plain values"
                )
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise ConfigError(
            f"bad config key '{key}': {reason}. "
            "Check the spelling against the dataclass schema and the value's type"
        ) from exc
    _check_literals(obj)
    return obj  # type: ignore[return-value]


def to_yaml(obj: Any) -> str:
    """Return the resolved config as YAML text (printed at start, saved in the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def split_cli(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into YAML paths and `key=value` overrides; drop the launcher's --local_rank."""
    yamls, overrides = [], []
    for arg in argv:
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            continue
        (overrides if "=" in arg else yamls).append(arg)
    return yamls, overrides
