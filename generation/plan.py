"""What to generate: one row per cell (condition values, library size, seed, interpolation α).

A plan is built identically on every rank from the command line (and a reference AnnData when
matching), so data-parallel generation only splits its batches. Library sizes are drawn here from
a NumPy RNG seeded by the generation seed, so they do not depend on the world size.

Shape legend: N planned cells (all seeds together).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from atlasldm.generation.vocabulary import ConditionError, Vocabulary

MIN_STATS_CELLS = 50  # a per-condition library-size statistic needs this many training cells
UNSET = ""  # condition value of an attribute left unconditioned in a row


@dataclass
class Plan:
    """Rows to generate, in output order."""

    values: dict[str, np.ndarray]  # attribute -> (N,) condition values (UNSET = unconditioned)
    library_size: np.ndarray  # (N,) float64 ℓ of each cell
    seed: np.ndarray  # (N,) int64 generation seed
    interp_alpha: np.ndarray | None = None  # (N,) α of a trajectory row
    interp: tuple[str, str, str] | None = None  # (attribute, from value, to value)
    library_source: str = ""  # how ℓ was chosen, written into the output's uns
    extra_obs: dict[str, np.ndarray] = field(default_factory=dict)  # copied to obs (match)

    @property
    def num_cells(self) -> int:
        """N."""
        return len(self.seed)

    def batches(self, batch_size: int) -> list[np.ndarray]:
        """Return row-index batches: contiguous, at most batch_size, one (seed, α) each.

        The list depends on the plan only, so rank r of W taking batches r, r+W, ... gives
        the same cells (and RNG streams) as one process.
        """
        alpha = self.interp_alpha if self.interp_alpha is not None else np.zeros(self.num_cells)
        key = np.stack([self.seed.astype(np.float64), alpha], axis=1)  # (N, 2)
        change = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
        out = []
        for group in np.split(np.arange(self.num_cells), change):
            out.extend(np.array_split(group, max(1, -(-len(group) // batch_size))))
        return [b for b in out if len(b)]


def parse_conditions(specs: Sequence[str], vocab: Vocabulary) -> dict[str, list[str]]:
    """Return attribute -> values from ``ATTR=VALUE`` specs (repeatable; VALUE ``*`` = all).

    Raises:
        ConditionError: malformed spec, unknown attribute or unknown value.
    """
    out: dict[str, list[str]] = {}
    for spec in specs:
        attr, sep, value = spec.partition("=")
        if not sep or not attr:
            raise ConditionError(f"--condition expects ATTR=VALUE, got {spec!r}")
        known = vocab.values(attr)
        chosen = list(known) if value == "*" else [vocab.check_value(attr, value)]
        out.setdefault(attr, [])
        out[attr] += [v for v in chosen if v not in out[attr]]
    return out


def _repeat_seeds(values: dict[str, np.ndarray], n: int, seeds: Sequence[int]):
    seeds = [int(s) for s in seeds]
    rep = {k: np.tile(v, len(seeds)) for k, v in values.items()}
    return rep, np.repeat(np.array(seeds, dtype=np.int64), n)


class LibrarySizes:
    """Draws ℓ per row: from the export's log-normal statistics, or a fixed value.

    Statistics (docs/model.md, 'Generation'): log ℓ ~ N(μ_c, σ_c²) of the first requested
    attribute whose value
    has at least MIN_STATS_CELLS training cells, else the global statistic.
    """

    def __init__(self, stats: dict | None, fixed: float | None = None) -> None:
        self.stats, self.fixed = stats, fixed
        if fixed is None and not stats:
            raise ConditionError(
                "the VAE export holds no library-size statistics (a direct-mode VAE run); "
                "pass --library-size N, or --match a reference whose library sizes are used"
            )

    def _params(self, row: dict[str, str]) -> tuple[float, float]:
        for attr, value in row.items():
            entry = (self.stats.get(attr) or {}).get(value)
            if entry and entry["n"] >= MIN_STATS_CELLS:
                return entry["mean"], entry["std"]
        return self.stats["all"]["mean"], self.stats["all"]["std"]

    def _row_params(self, attrs: list[str], row: np.ndarray, interp) -> tuple[float, ...]:
        given = {a: v for a, v in zip(attrs, row, strict=True) if v != UNSET}
        if interp is None:
            return (*self._params(given),) * 2
        attr, a, b = interp
        return (*self._params({**given, attr: a}), *self._params({**given, attr: b}))

    def draw(self, values: dict[str, np.ndarray], seeds: np.ndarray, alpha=None, interp=None):
        """Return (N,) library sizes; trajectory rows interpolate log-space parameters in α."""
        n = len(seeds)
        if self.fixed is not None:
            return np.full(n, float(self.fixed))
        attrs = list(values)
        rows = np.stack([values[a] for a in attrs], axis=1) if attrs else np.zeros((n, 0))
        # One parameter lookup per distinct condition row, not per cell (atlas-sized plans).
        keys = np.array(["\x1f".join(map(str, r)) for r in rows]) if attrs else np.zeros(n, str)
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        params = np.array([self._row_params(attrs, rows[i], interp) for i in first])  # (U, 4)
        p = params[inverse.ravel()]  # (N, 4): mean, std at A (or the only) and at B
        a = np.zeros(n) if alpha is None else np.asarray(alpha, dtype=float)
        mean, std = (1 - a) * p[:, 0] + a * p[:, 2], (1 - a) * p[:, 1] + a * p[:, 3]
        out = np.empty(n)
        for s in np.unique(seeds):  # one stream per seed: independent of the other seeds
            sel = seeds == s
            rng = np.random.default_rng([int(s), 0x11B])
            out[sel] = np.exp(mean[sel] + std[sel] * rng.standard_normal(int(sel.sum())))
        return np.maximum(np.round(out), 1.0)


def grid_plan(
    conditions: dict[str, list[str]], n_cells: int, seeds: Sequence[int], libs: LibrarySizes
) -> Plan:
    """Return n_cells rows per combination of the given values (Cartesian product), per seed."""
    if n_cells < 1:
        raise ConditionError(f"--n-cells must be >= 1, got {n_cells}")
    attrs = list(conditions)
    combos = list(itertools.product(*(conditions[a] for a in attrs)))  # [()] when unconditional
    values = {
        a: np.repeat([c[j] for c in combos], n_cells).astype(object) for j, a in enumerate(attrs)
    }
    n = len(combos) * n_cells
    values, seed = _repeat_seeds(values, n, seeds)
    return Plan(values, libs.draw(values, seed), seed, library_source="statistics")


def interpolation_plan(
    spec: str,
    steps: int,
    n_cells: int,
    conditions: dict[str, list[str]],
    seeds: Sequence[int],
    vocab: Vocabulary,
    libs: LibrarySizes,
) -> Plan:
    """Return a trajectory ``ATTR=A:B``: n_cells rows at each of `steps` α values in [0, 1].

    Other attributes may be fixed with single values in `conditions`.
    """
    attr, sep, pair = spec.partition("=")
    a, colon, b = pair.partition(":")
    if not sep or not colon or not a or not b:
        raise ConditionError(f"--interpolate expects ATTR=A:B, got {spec!r}")
    a, b = vocab.check_value(attr, a), vocab.check_value(attr, b)
    if steps < 2:
        raise ConditionError(f"--interp-steps must be >= 2, got {steps}")
    if attr in conditions:
        raise ConditionError(f"{attr!r} is interpolated; do not also pass it to --condition")
    if any(len(v) != 1 for v in conditions.values()):
        raise ConditionError("with --interpolate, every --condition attribute takes one value")
    alphas = np.repeat(np.linspace(0.0, 1.0, steps), n_cells)
    n = len(alphas)
    values = {k: np.full(n, v[0], dtype=object) for k, v in conditions.items()}
    values[attr] = np.full(n, f"{a}->{b}", dtype=object)
    values, seed = _repeat_seeds(values, n, seeds)
    alpha = np.tile(alphas, len(seeds))
    fixed = {k: v for k, v in values.items() if k != attr}
    lib = libs.draw(fixed, seed, alpha, (attr, a, b))
    return Plan(values, lib, seed, alpha, (attr, a, b), library_source="statistics")


def match_plan(
    reference,
    keys: Sequence[str],
    seeds: Sequence[int],
    vocab: Vocabulary,
    libs: LibrarySizes | None,
    library_key: str | None = None,
) -> Plan:
    """Return one row per reference cell (same conditions), per seed.

    ℓ comes from the reference (obs[library_key], else the row sums of X) when `libs` is None,
    else from the statistics.

    Raises:
        ConditionError: a key missing from obs, an unknown value, an empty reference.
    """
    if reference.n_obs == 0:
        raise ConditionError("the --match reference has no cells")
    missing = [k for k in keys if k not in reference.obs]
    if missing:
        raise ConditionError(
            f"the --match reference lacks obs columns {missing}; it has {list(reference.obs)}; "
            "pass --match-keys with the columns to condition on"
        )
    values = {}
    for k in keys:
        col = reference.obs[k].astype(str).to_numpy()
        for v in np.unique(col):
            vocab.check_value(k, v)
        values[k] = col.astype(object)
    n = reference.n_obs
    values, seed = _repeat_seeds(values, n, seeds)
    if libs is not None:
        return Plan(values, libs.draw(values, seed), seed, library_source="statistics")
    if library_key and library_key not in reference.obs:
        raise ConditionError(
            f"--library-size {library_key}: the --match reference has no obs column "
            f"{library_key!r}; it has {list(reference.obs)}"
        )
    if library_key:
        lib = reference.obs[library_key].to_numpy(dtype=np.float64)
        source = f"reference obs[{library_key!r}]"
    else:
        lib = np.asarray(reference.X.sum(axis=1), dtype=np.float64).ravel()
        source = "reference row sums of X"
    if not np.all(np.isfinite(lib)) or np.any(lib <= 0):
        raise ConditionError(
            f"the --match reference has non-positive or NaN library sizes ({source})"
        )
    extra = {"matched_obs_name": np.tile(reference.obs_names.to_numpy(dtype=object), len(seeds))}
    return Plan(values, np.tile(lib, len(seeds)), seed, library_source=source, extra_obs=extra)


def library_mode(value: str | float, has_match: bool) -> tuple[str, float | str | None]:
    """Return --library-size as ("fixed", ℓ), ("stats", None) or ("reference", obs column)."""
    try:
        return "fixed", float(value)
    except ValueError:
        pass
    text = str(value)
    if text == "auto":
        text = "reference" if has_match else "stats"
    if text == "stats":
        return "stats", None
    if not has_match:
        raise ConditionError(f"--library-size {text} takes sizes from a reference: add --match")
    return "reference", None if text == "reference" else text


def plan_request(request, vocab: Vocabulary, stats: dict | None, conditioned: list[str]) -> Plan:
    """Return the plan of a generation request (grid, match or trajectory).

    `request` is a `generation.api.GenerationRequest`; `stats` the VAE export's library-size
    statistics; `conditioned` the attributes a `match` follows unless `match_keys` are given.
    """
    r = request
    conditions = parse_conditions(r.conditions, vocab)
    mode, value = library_mode(r.library_size, r.match is not None)
    libs = None
    if mode != "reference":
        libs = LibrarySizes(stats, value if mode == "fixed" else None)
    if r.match is not None:
        if conditions or r.interpolate:
            raise ConditionError("--match cannot be combined with --condition or --interpolate")
        keys = r.match_keys if r.match_keys is not None else conditioned
        return match_plan(r.match, keys, r.seeds, vocab, libs, value if libs is None else None)
    if r.n_cells < 1:
        raise ConditionError(f"--n-cells must be >= 1, got {r.n_cells}")
    if r.interpolate:
        return interpolation_plan(
            r.interpolate, r.interp_steps, r.n_cells, conditions, r.seeds, vocab, libs
        )
    return grid_plan(conditions, r.n_cells, r.seeds, libs)
