"""Help text for a typed config schema, generated from its dataclasses so that it cannot drift.

Every key of a training config is a dataclass field. Its type comes from the annotation, its
default from an instance of the schema, and its one-line doc from the comment the field carries
in the class source, read with `tokenize`: the trailing comment of the field's statement
(`lr: float = 1e-3  # peak learning rate`, or on the closing line of a multi-line `field(...)`),
else the comment block right above it. A field a subclass overrides without a comment keeps the
doc of the class it overrides; a section (a dataclass-typed field) without one uses the first
line of its class docstring. docs/cli.md shows the result.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any

WIDTH = 100  # help lines are wrapped to this many characters


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One leaf key of a schema: `section.key`, its type, default and doc."""

    name: str  # dotted key as written in a key=value override
    type: str  # the annotation, readably (`{fp32,bf16,fp16}` for a Literal)
    default: Any  # the schema instance's value
    doc: str  # the field's comment ("" when it has none: a test rejects that)


@functools.cache
def _class_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the source of `cls` itself (fields it declares)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (built in C, or defined in a REPL)
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            docs[node.target.id] = _statement_doc(node, comments, lines)
    return docs


def _statement_doc(node: ast.AnnAssign, comments: dict[int, str], lines: list[str]) -> str:
    """The comment(s) on the statement's own lines, else the comment block right above it."""
    own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
    if own:
        return " ".join(own)
    above: list[str] = []
    line = node.lineno - 1
    while line in comments and lines[line - 1].lstrip().startswith("#"):
        above.insert(0, comments[line])
        line -= 1
    return " ".join(above)


def field_doc(cls: type, name: str) -> str:
    """The doc of field `name` of dataclass `cls`: its comment in the most derived class that
    has one, else (for a section) the first line of the section class's docstring."""
    for klass in cls.__mro__:
        doc = _class_comments(klass).get(name, "") if dataclasses.is_dataclass(klass) else ""
        if doc:
            return doc
    section = _field_types(cls).get(name)
    return class_doc(section) if dataclasses.is_dataclass(section) else ""


def class_doc(cls: type) -> str:
    """The first line of the class docstring ("" for none: `dataclass` then writes the
    signature there, which is no doc)."""
    doc = (cls.__doc__ or "").strip()
    return "" if doc.startswith(f"{cls.__name__}(") else doc.splitlines()[0] if doc else ""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (string annotations and aliases evaluated)."""
    return typing.get_type_hints(cls)


def type_name(hint: Any) -> str:
    """A readable type: `int`, `list[str]`, `{fp32,bf16,fp16}` for a Literal."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "{" + ",".join(str(choice) for choice in typing.get_args(hint)) + "}"
    if origin is not None:
        args = [type_name(a) for a in typing.get_args(hint)]
        if origin in (typing.Union, types.UnionType):  # Optional[int], int | None
            return " | ".join(args)
        return f"{getattr(origin, '__name__', origin)}[{', '.join(args)}]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def sections(schema: type) -> list[tuple[str, str]]:
    """The top-level sections of `schema`: (name, doc), in declaration order. The doc is the
    section class's docstring line, then (after a dash) the schema's comment on the field."""
    hints = _field_types(schema)
    out = []
    for fld in dataclasses.fields(schema):
        section = hints[fld.name]
        if dataclasses.is_dataclass(section):
            what, here = class_doc(section), field_doc(schema, fld.name)
            both = here and what and here != what
            out.append((fld.name, f"{what.rstrip('.')} — {here}" if both else what or here))
    return out


def config_keys(schema: type, instance: Any = None, prefix: str = "") -> list[ConfigKey]:
    """Every leaf key of `schema`, depth first, with its default taken from `instance`
    (default: `schema()`, so a section's overridden defaults are the ones shown)."""
    instance = schema() if instance is None else instance
    hints = _field_types(schema)
    keys = []
    for fld in dataclasses.fields(schema):
        value, hint = getattr(instance, fld.name), hints[fld.name]
        if dataclasses.is_dataclass(hint):
            keys += config_keys(hint, value, f"{prefix}{fld.name}.")
        else:
            doc = field_doc(schema, fld.name)
            keys.append(ConfigKey(prefix + fld.name, type_name(hint), value, doc))
    return keys


def _shown(value: Any) -> str:
    """A default as a user would write it in a key=value override or YAML."""
    if isinstance(value, str):
        return repr(value) if value == "" or value.strip() != value else value
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def schema_help(schema: type) -> str:
    """The `config keys` part of a training command's --help: every section and key with its
    type, default and doc, grouped by section."""
    docs = dict(sections(schema))
    out = ["config keys (set them in a YAML file or as key=value; the defaults are shown):"]
    current = None
    for key in config_keys(schema):
        section = key.name.split(".")[0] if "." in key.name else ""
        if section != current:
            current = section
            header = f"{section}: {docs.get(section, '')}" if section else "top level:"
            out += ["", *textwrap.wrap(header, WIDTH, subsequent_indent="  ")]
        out.append(f"  {key.name} ({key.type}, default: {_shown(key.default)})")
        out += textwrap.wrap(key.doc, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out)
