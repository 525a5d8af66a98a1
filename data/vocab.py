"""Gene vocabulary (feature ids -> tokens) and condition label vocabularies.

Token convention: token = vocabulary index + 1; token 0 is PAD. The vocabulary of a training copy
is its var table in soma_joinid order, so token = var soma_joinid + 1.

A vocabulary file is a copy's `genes.tsv` (`GeneVocab.save`) or, for direct mode's
`data.vocab_path`, a plain gene list: one feature id per line, optionally followed by a tab and
the gene name (`GeneVocab.read` takes both).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

_HEADER = "token\tfeature_id\tfeature_name"
# A plain gene list may start with a header line naming its column; these names are not genes.
LIST_HEADERS = frozenset({"feature_id", "gene_id", "gene_ids", "ensembl_id", "id"})


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path atomically (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; copies are read by other users' jobs
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_feature_ids(
    feature_ids: Sequence[object], where: str, error: type[ValueError] = ValueError
) -> list[str]:
    """Return feature ids as strings; raise `error` on missing/empty or duplicate ids."""
    ids = ["" if x is None else str(x) for x in feature_ids]
    missing = [i for i, x in enumerate(ids) if x.strip() == "" or x.lower() in ("nan", "none")]
    if missing:
        raise error(
            f"{where}: {len(missing)} genes have an empty or missing feature_id (e.g. var rows "
            f"{missing[:5]}); give every gene a unique feature_id (Ensembl id) or drop those genes"
        )
    dups = [x for x, c in Counter(ids).items() if c > 1]
    if dups:
        raise error(
            f"{where}: {len(dups)} duplicate feature_id values, e.g. {dups[:5]}; feature_id "
            "must be unique: aggregate or drop the duplicated genes before ingest"
        )
    return ids


class GeneVocab:
    """Ordered gene vocabulary keyed by unique feature ids; token = index + 1 (0 is PAD)."""

    def __init__(self, feature_ids: Sequence[str], feature_names: Sequence[str]):
        ids = [("" if x is None else str(x)) for x in feature_ids]
        names = [("" if x is None else str(x)) for x in feature_names]
        if len(ids) != len(names):
            raise ValueError(
                f"GeneVocab: {len(ids)} feature ids but {len(names)} feature names; "
                "pass one name per id"
            )
        check_feature_ids(ids, "GeneVocab")
        self.feature_ids: list[str] = ids
        self.feature_names: list[str] = names
        self._index = {x: i for i, x in enumerate(ids)}

    def __len__(self) -> int:
        """Number of genes V (tokens are 1..V)."""
        return len(self.feature_ids)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, GeneVocab)
            and self.feature_ids == other.feature_ids
            and self.feature_names == other.feature_names
        )

    def __repr__(self) -> str:
        return f"GeneVocab(V={len(self)}, fingerprint={self.fingerprint()[:12]})"

    def tsv_text(self) -> str:
        """The genes.tsv text: header `token\\tfeature_id\\tfeature_name`, one line per gene."""
        lines = [_HEADER]
        for i, (fid, name) in enumerate(zip(self.feature_ids, self.feature_names, strict=True)):
            if "\t" in fid or "\n" in fid or "\t" in name or "\n" in name:
                raise ValueError(f"GeneVocab.save: tab or newline in gene {fid!r}/{name!r}")
            lines.append(f"{i + 1}\t{fid}\t{name}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write genes.tsv (`tsv_text`)."""
        atomic_write_text(path, self.tsv_text())

    @classmethod
    def read(cls, path: str | os.PathLike) -> GeneVocab:
        """Read a genes.tsv (`load`) or a plain gene list (`from_list_lines`), by its first line."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"gene vocabulary {path} not found; give a genes.tsv (a training copy's) or a "
                "text file with one gene id per line"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0] == _HEADER:
            return cls.load(path)
        return cls.from_list_lines(lines, str(path))

    @classmethod
    def from_list_lines(cls, lines: Sequence[str], where: str) -> GeneVocab:
        """Vocabulary of a plain gene list: `feature_id[\\tfeature_name[\\t...]]` per line.

        Blank lines and `#` comments are skipped, and a first line naming the column
        (`LIST_HEADERS`) too; rows `1\\tid\\tname`, `2\\t...` (a genes.tsv without its header) are
        read as such. A gene without a name is named by its id.
        """
        rows = [[f.strip() for f in ln.split("\t")] for ln in lines]
        rows = [r for r in rows if r[0] and not r[0].startswith("#")]
        if rows and rows[0][0].lower() in LIST_HEADERS:
            rows = rows[1:]
        if rows and all(len(r) >= 3 and r[0] == str(i + 1) for i, r in enumerate(rows)):
            rows = [r[1:] for r in rows]  # numbered like a genes.tsv
        if not rows:
            raise ValueError(f"gene list {where} holds no gene ids; write one id per line")
        ids = check_feature_ids([r[0] for r in rows], f"gene list {where}")
        return cls(ids, [r[1] if len(r) > 1 and r[1] else r[0] for r in rows])

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        """Read a genes.tsv written by `save`; raises ValueError if missing or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"gene vocabulary {path} not found; is this a complete training copy?")
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or lines[0] != _HEADER:
            raise ValueError(f"gene vocabulary {path} is corrupt: expected header {_HEADER!r}")
        ids, names = [], []
        for lineno, line in enumerate(lines[1:], start=2):
            parts = line.split("\t")
            if len(parts) != 3 or parts[0] != str(lineno - 1):
                raise ValueError(
                    f"gene vocabulary {path} is corrupt at line {lineno}: {line!r} "
                    f"(expected token {lineno - 1}, feature_id, feature_name)"
                )
            ids.append(parts[1])
            names.append(parts[2])
        return cls(ids, names)

    def token_lookup(
        self, source_feature_ids: Sequence[str], unknown: Literal["error", "drop"] = "error"
    ) -> tuple[np.ndarray, int]:
        """Map source genes to tokens.

        Args:
            source_feature_ids: feature ids of the source's genes, in source order.
            unknown: "error" raises on ids not in the vocabulary; "drop" maps them to token 0.

        Returns:
            (tokens int32 (n_source,), with 0 for dropped genes; number of dropped genes).
        """
        if unknown not in ("error", "drop"):
            raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
        get = self._index.get
        tokens = np.fromiter(
            (get(str(x), -1) + 1 for x in source_feature_ids),
            dtype=np.int32,
            count=len(source_feature_ids),
        )
        n_drop = int((tokens == 0).sum())
        if n_drop and unknown == "error":
            bad = [str(x) for x, t in zip(source_feature_ids, tokens, strict=True) if t == 0]
            raise ValueError(
                f"{n_drop} source genes are not in the vocabulary, e.g. {bad[:5]}; "
                "pass unknown='drop' to ignore them"
            )
        return tokens, n_drop

    def fingerprint(self) -> str:
        """sha256 hex digest of the ordered feature ids."""
        h = hashlib.sha256()
        for fid in self.feature_ids:
            h.update(fid.encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


def save_labels(path: str | os.PathLike, labels: dict[str, list[str]]) -> None:
    """Atomically write labels.json: {column: [value_0, ...]}, code = index."""
    clean = {str(k): [str(v) for v in vals] for k, vals in labels.items()}
    atomic_write_text(path, json.dumps(clean, indent=1, sort_keys=True) + "\n")


def load_labels(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read labels.json; raises ValueError if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"label vocabularies {path} not found; is this a complete training copy?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"label vocabularies {path} are corrupt: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"label vocabularies {path} are corrupt: expected {{column: [values]}}")
    return {str(k): [str(v) for v in vals] for k, vals in data.items()}


def encode_labels(values: Sequence[str], vocabulary: list[str]) -> np.ndarray:
    """Return int32 codes (index into vocabulary) of values; an unseen value raises ValueError."""
    arr = np.asarray([str(v) for v in values], dtype=object)
    vocab = np.asarray(vocabulary, dtype=object)
    order = np.argsort(vocab)
    sorted_vocab = vocab[order]
    if len(vocab) == 0:
        if len(arr):
            raise ValueError(f"label {arr[0]!r} not in an empty vocabulary")
        return np.zeros(0, dtype=np.int32)
    pos = np.searchsorted(sorted_vocab, arr)
    pos = np.clip(pos, 0, len(vocab) - 1)
    ok = sorted_vocab[pos] == arr
    if not ok.all():
        unseen = sorted(set(arr[~ok].tolist()))
        raise ValueError(
            f"{len(unseen)} label values not in the vocabulary, e.g. {unseen[:5]}; "
            "rebuild labels.json from the data or map these values first"
        )
    return order[pos].astype(np.int32)
