"""Ingest sources, parsed from a `--source` string; each yields an open SOMA Experiment.

| source string | what | staging |
|---|---|---|
| `builtin:pbmc68k` (default) | scanpy's pbmc68k_reduced, counts recovered | `.staging/pbmc68k` |
| `synthetic:cells=N,genes=G,...` | NB synthetic data, Census layout | `.staging/synthetic` |
| `a.h5ad`, `a.h5ad,b.h5ad`, or a folder of .h5ad | registered + appended | `.staging/h5ad` |
| a SOMA Experiment path or `s3://` URI | read directly | none |
| `census` or `census:VERSION` | CELLxGENE Census `census_data/<organism>` | none |

Staging experiments live under the output folder's `.staging/` and are reused when complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiledbsoma

from atlasldm.data import soma
from atlasldm.data.h5ad_stage import changed_inputs, stage_h5ads
from atlasldm.data.pbmc import write_pbmc_experiment
from atlasldm.data.synthetic import parse_spec, write_synthetic_experiment
from atlasldm.data.validate import IngestError

logger = logging.getLogger(__name__)

CENSUS_DEFAULT_FILTER = "is_primary_data == True"


@dataclass
class Source:
    """A parsed ingest source; `prepare` stages it (worker 0), `open` yields the Experiment."""

    kind: str  # one of pbmc68k, synthetic, h5ad, soma, census
    text: str  # the --source string as given
    paths: list[str] = field(default_factory=list)  # h5ad files
    uri: str | None = None  # SOMA experiment URI (soma kind)
    census_version: str | None = None
    census_uri: str | None = None
    organism: str = "homo_sapiens"
    layer: str | None = None  # h5ad layer holding counts (default .raw.X, else .X)
    tiledb_config: dict[str, Any] | None = None

    @property
    def default_filter(self) -> str | None:
        """obs value_filter used when the user gives none."""
        return CENSUS_DEFAULT_FILTER if self.kind == "census" else None

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in the manifest."""
        desc: dict[str, Any] = {"kind": self.kind, "source": self.text}
        if self.kind == "census":
            desc.update(
                census_version=self.census_version,
                census_uri=self.census_uri,
                organism=self.organism,
            )
        if self.kind == "h5ad":
            desc.update(paths=self.paths, layer=self.layer)
        return desc

    def staging_uri(self, out: Path) -> str | None:
        """Where the staged experiment lives, or None if the source is read directly."""
        if self.kind in ("pbmc68k", "synthetic", "h5ad"):
            name = {"pbmc68k": "pbmc68k"}.get(self.kind, self.kind)
            return str(Path(out) / ".staging" / name)
        return None

    def prepare(self, out: Path) -> None:
        """Create the staging experiment if this source needs one (idempotent)."""
        uri = self.staging_uri(out)
        if self.kind == "pbmc68k":
            write_pbmc_experiment(uri)
        elif self.kind == "synthetic":
            write_synthetic_experiment(uri, self.text)
        elif self.kind == "h5ad":
            stage_h5ads(self.paths, uri, self.layer)

    def changed_inputs(self, out: Path) -> list[str]:
        """Input files that differ from what was staged in out (none for other sources)."""
        if self.kind != "h5ad":
            return []  # builtins are regenerated identically; other sources are read directly
        return changed_inputs(self.paths, str(self.staging_uri(out)))

    @contextlib.contextmanager
    def open(self, out: Path) -> Iterator[tiledbsoma.Experiment]:
        """Yield the source experiment opened for reading."""
        ctx = soma.make_context(self.tiledb_config)
        if self.kind == "census":
            census, exp = soma.open_census_experiment(
                self.organism, self.census_version, self.census_uri, self.tiledb_config
            )
            try:
                yield exp
            finally:
                census.close()
            return
        uri = self.staging_uri(out) or self.uri
        with soma.open_experiment(uri, ctx) as exp:
            yield exp


def same_source(recorded: dict, current: dict) -> bool:
    """Whether two `Source.describe()` records name the same data.

    h5ad sources compare by resolved paths and layer, so `a.h5ad` and `./a.h5ad` agree.
    """
    if recorded.get("kind") != current.get("kind"):
        return False
    if current["kind"] == "h5ad":
        keys = ("paths", "layer")
        return all(recorded.get(k) == current.get(k) for k in keys)
    return recorded == current


def parse_source(
    text: str,
    organism: str = "homo_sapiens",
    census_uri: str | None = None,
    layer: str | None = None,
    tiledb_config: dict[str, Any] | None = None,
) -> Source:
    """Parse a --source string (see the module table); raises IngestError if unrecognised."""
    text = text.strip()
    common: dict[str, Any] = {"text": text, "tiledb_config": tiledb_config}
    if text == "builtin:pbmc68k":
        return Source(kind="pbmc68k", **common)
    if text.startswith("builtin:"):
        raise IngestError(f"unknown builtin source {text!r}; available: builtin:pbmc68k")
    if text.startswith("synthetic:"):
        parse_spec(text)  # fail early on a bad spec
        return Source(kind="synthetic", **common)
    if text == "census" or text.startswith("census:"):
        version = text.partition(":")[2] or None
        return Source(
            kind="census",
            census_version=version,
            census_uri=census_uri,
            organism=organism,
            **common,
        )
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all(p.endswith(".h5ad") for p in parts):
        missing = [p for p in parts if not Path(p).is_file()]
        if missing:
            raise IngestError(f"h5ad file(s) not found: {missing[:5]}")
        return Source(
            kind="h5ad", paths=[str(Path(p).resolve()) for p in parts], layer=layer, **common
        )
    if text.startswith("s3://") or "://" in text:
        return Source(kind="soma", uri=text, **common)
    path = Path(text)
    if path.is_dir():
        h5ads = sorted(str(p.resolve()) for p in path.glob("*.h5ad"))
        if h5ads:
            return Source(kind="h5ad", paths=h5ads, layer=layer, **common)
        return Source(kind="soma", uri=str(path.resolve()), **common)
    raise IngestError(
        f"source {text!r} is not builtin:pbmc68k, synthetic:..., census[:VERSION], an .h5ad "
        "file/list/folder, or an existing SOMA experiment path or URI"
    )
