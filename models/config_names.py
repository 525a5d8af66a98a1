"""Renamed config fields: configs and exports that use an old name keep loading, with a warning.

Each model config dataclass lists its renamed fields in a ``DEPRECATED_NAMES`` class variable
(old name -> new name). :func:`upgrade_config_dict` renames the keys of one config's dict (an
export's ``config.json``); :func:`upgrade_config_tree` walks a nested run schema, a stage config
whose sections are model configs, and upgrades every section of a YAML file or of the
``key=value`` overrides. Each old key found gives one :class:`DeprecatedNameWarning` that names
the old and the new key.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Mapping
from typing import Any


class DeprecatedNameWarning(DeprecationWarning):
    """A config key uses the old name of a renamed field; the message names the new one."""


# Python shows a DeprecationWarning only for code run as __main__; this one is about the user's
# own YAML or export, not about library code, so it is shown (once per distinct message).
warnings.filterwarnings("default", category=DeprecatedNameWarning)


def deprecated_names(cls: type) -> dict[str, str]:
    """Return the renamed fields of config class ``cls`` as {old name: new name} ({} if none)."""
    return dict(getattr(cls, "DEPRECATED_NAMES", {}))


def upgrade_config_dict(
    cls: type, values: Mapping[str, Any], prefix: str = "", where: str = ""
) -> dict[str, Any]:
    """Return ``values`` (keyword arguments of ``cls``) with every old field name renamed.

    Args:
        cls: the config dataclass, e.g. ``DiTConfig``.
        values: its fields as a dict; keys that are not old names pass through unchanged.
        prefix: dotted path of this section in the warning, e.g. ``"model."``.
        where: the file the values come from, named in the warning.

    Raises:
        ValueError: a key is given under both its old and its new name.
    """
    renames = deprecated_names(cls)
    source = f" in {where}" if where else ""
    for old in (k for k in values if k in renames):
        new = renames[old]
        if new in values:
            raise ValueError(
                f"config keys '{prefix}{old}' and '{prefix}{new}'{source} set the same "
                f"{cls.__name__} field ('{old}' is its old name); keep only '{prefix}{new}'"
            )
        warnings.warn(
            f"config key '{prefix}{old}'{source} is deprecated: {cls.__name__} renamed it "
            f"'{prefix}{new}'; write '{prefix}{new}'",
            DeprecatedNameWarning,
            stacklevel=2,
        )
    return {renames.get(k, k): v for k, v in values.items()}


def upgrade_config_tree(schema: type, tree: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Return a nested config dict shaped like dataclass ``schema`` with every old name renamed.

    Every section whose field type is a dataclass is upgraded recursively, so a stage schema
    with ``model: DiTConfig`` turns ``{"model": {"hidden_dim": 128}}`` into
    ``{"model": {"embed_dim": 128}}``. ``tree`` is a YAML file or the ``key=value`` overrides
    as a plain container (``OmegaConf.to_container``); anything but a mapping is returned as
    it is, for the loader to reject.
    """
    if not isinstance(tree, Mapping):
        return tree
    return _upgrade_tree(schema, tree, "", where)


def _upgrade_tree(schema: type, tree: Mapping[str, Any], prefix: str, where: str) -> dict:
    out = upgrade_config_dict(schema, tree, prefix, where)
    hints = typing.get_type_hints(schema)
    for fld in dataclasses.fields(schema):
        section, kind = out.get(fld.name), hints.get(fld.name)
        if (
            isinstance(section, Mapping)
            and isinstance(kind, type)
            and dataclasses.is_dataclass(kind)
        ):
            out[fld.name] = _upgrade_tree(kind, section, f"{prefix}{fld.name}.", where)
    return out
