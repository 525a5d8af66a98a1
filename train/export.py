"""Export folders of the training stages: weights, config, side files, provenance, model card.

The folder format and its atomic writer are `models.export_format` (loadable with torch,
safetensors and json alone; docs/api.md). On top of it this module adds what a training run
knows: `model_type` and `format_version` in config.json, `provenance.json` (`provenance_json`)
with the VAE of a latent stage named by a path relative to the export folder, so a run tree
moved or copied as a whole keeps its references, and a `README.md` model card.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

# The reading side and the format constants live in models/, so that downstream packages load
# exports with models alone; this module adds what a training run records.
from atlasldm.models.export_format import (  # noqa: F401  (re-exported)
    CARD,
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    ExportError,
    infer_model_type,
    read_export,
    write_export_folder,
)

REPO_ROOT = Path(__file__).resolve().parents[1]  # a git checkout, or site-packages/atlasldm
PROVENANCE = "provenance.json"


def write_export(
    folder: str | Path,
    state_dict_fp32: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    extra_files: dict[str, bytes | str] | None = None,
) -> Path:
    """Write an export folder atomically and return its path; an existing export is replaced.

    Args:
        folder: destination folder, e.g. `runs/<name>/export`.
        state_dict_fp32: full weights (consolidated, fp32); tensors are made contiguous on CPU.
        model_config: JSON-serialisable model config (the model dataclass as a dict; a
            denoiser's carries `"denoiser"`). Its model type is recorded when it tells one.
        extra_files: file name -> content (str or bytes), e.g. `genes.tsv`, `conditions.json`.
            A `provenance.json` naming `vae_export` gets that path relative to `folder`; a
            `README.md` model card is written unless one is given.
    """
    folder = Path(folder)
    extra = dict(extra_files or {})
    kind = infer_model_type(model_config)
    config = {"format_version": FORMAT_VERSION, **model_config}
    if kind is not None:
        config["model_type"] = kind
    if isinstance(extra.get(PROVENANCE), str):
        extra[PROVENANCE] = _relative_vae_path(extra[PROVENANCE], folder)
    if CARD not in extra:
        extra[CARD] = model_card(kind, model_config, extra, _parameter_count(state_dict_fp32))
    return write_export_folder(folder, state_dict_fp32, config, extra)


def _relative_vae_path(provenance: str, folder: Path) -> str:
    """Rewrite `vae_export` (a path as the run was given it) relative to the export folder."""
    try:
        record = json.loads(provenance)
    except json.JSONDecodeError:
        return provenance  # not ours to judge: written as given
    if not isinstance(record, dict) or not record.get("vae_export"):
        return provenance
    target = os.path.abspath(record["vae_export"])
    record["vae_export"] = os.path.relpath(target, os.path.abspath(folder))
    return json.dumps(record, indent=2, default=str)


def _parameter_count(state: dict[str, torch.Tensor]) -> int:
    return sum(int(t.numel()) for t in state.values())


def code_version() -> str:
    """Return the git commit of this code (with '+dirty'), else the installed package version.

    Git runs in the package's own folder, never the caller's working directory (which may be
    another repository); an installed wheel has no `.git` and reports `atlasldm==<version>`.
    """
    if (REPO_ROOT / ".git").exists():
        try:
            git = ["git", "-C", str(REPO_ROOT)]
            head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
            dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
            if head.returncode == 0 and head.stdout.strip():
                return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except OSError:  # no git executable: fall through to the package metadata
            pass
    try:
        return f"atlasldm=={version('atlasldm')}"
    except PackageNotFoundError:
        return "unknown"


def provenance_json(stage: str, info: dict[str, Any], **fields: Any) -> str:
    """Return the text of an export's provenance.json.

    Holds the stage name, the loop's export `info` (step, cells seen, validation metrics), the
    stage's own `fields` (data source, fingerprints, ...), the code version and the UTC time.
    """
    record = {
        "stage": stage,
        **info,
        **fields,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return json.dumps(record, indent=2, default=str)


# --- model card ----------------------------------------------------------------------------

TITLES = {
    "vae": "scLDM VAE (MCAB set-transformer encoder, negative-binomial decoder)",
    "dit": "scLDM latent Diffusion Transformer (flow matching)",
    "skip_mlp": "scLDM latent skip-connected MLP denoiser (flow matching)",
    "classifier": "scLDM noisy-latent classifier (classifier guidance)",
}
USES = {
    "vae": "Encode single-cell RNA counts over its gene vocabulary to latents (`.encode`) and "
    "decode latents to negative-binomial counts. The first stage of scLDM; on its own it "
    "samples cells from its prior (the 'w/o LDM' ablation).",
    "dit": "Generate synthetic single-cell count profiles, with its VAE, conditioned on the "
    "attributes below (classifier-free guidance).",
    "classifier": "Steer a denoiser's generation towards values of one attribute (classifier "
    "guidance), with the VAE and denoiser it was trained beside.",
}
USES["skip_mlp"] = USES["dit"]
LIMITS = (
    "Research use: benchmarking, augmentation and in-silico exploration. Generated cells "
    "follow the training data, its cell populations and biases; they are not measurements and "
    "not for clinical decisions."
)


def model_card(kind: str | None, config: dict[str, Any], extra: dict, n_params: int) -> str:
    """Return the README.md of an export: data, training, metrics, intended use, how to load."""
    prov = _json_of(extra.get(PROVENANCE))
    lines = [f"# {TITLES.get(kind or '', 'atlasldm model export')}", ""]
    lines += [f"- model type: `{kind}` (config.json `model_type`), export format {FORMAT_VERSION}"]
    lines += [f"- parameters: {n_params:,}"]
    for key in ("code_version", "created", "weights"):
        if key in prov:
            lines.append(f"- {key.replace('_', ' ')}: {prov[key]}")
    lines += ["", "## Training data", "", *_data_lines(config, extra, prov), ""]
    lines += ["## Training", "", *_training_lines(prov), ""]
    lines += ["## Intended use", "", USES.get(kind or "", "A model of atlasldm."), "", LIMITS]
    lines += ["", "## How to load", "", *_load_lines(kind), ""]
    return "\n".join(lines)


def _json_of(text: Any) -> dict:
    try:
        record = json.loads(text) if isinstance(text, str | bytes) else {}
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _copy_manifest(source: str | None) -> dict:
    """The training copy's manifest.json (cells, genes, filter), or {} in direct mode."""
    path = Path(source) / "manifest.json" if source else None
    if path is None or not path.is_file():
        return {}
    return _json_of(path.read_text())


def _data_lines(config: dict, extra: dict, prov: dict) -> list[str]:
    copy = _copy_manifest(prov.get("data_source"))
    origin = (copy.get("source") or {}).get("source")
    source = f"`{prov.get('data_source', 'not recorded')}`"
    lines = [f"- source: {source}" + (f" (training copy of `{origin}`)" if origin else "")]
    cells = f"{copy['n_cells']:,} in the training copy" if "n_cells" in copy else "not recorded"
    if "cells_seen" in prov:
        cells += f"; {prov['cells_seen']:,} seen in training"
    genes = extra.get("genes.tsv")
    n_genes = config.get("num_genes") or copy.get("n_genes")
    if n_genes is None and isinstance(genes, str):
        n_genes = max(len(genes.strip().splitlines()) - 1, 0)
    lines += [f"- cells: {cells}", f"- genes: {n_genes if n_genes is not None else 'n/a'}"]
    obs_filter = f"`{copy['obs_filter']}`" if copy.get("obs_filter") else "none"
    lines.append(f"- filter: {obs_filter if copy else 'not recorded'}")
    if "data_mode" in prov:  # how training read the source, and its own obs filter
        training_filter = f"`{prov['data_obs_filter']}`" if prov.get("data_obs_filter") else "none"
        lines.append(f"- read as: {prov['data_mode']} mode; training filter: {training_filter}")
    lines += [f"- conditions: {c}" for c in _conditions(extra)]
    if "vae_export" in prov:
        lines.append(
            f"- VAE export: `{prov['vae_export']}` (relative to this folder; digest "
            f"{prov.get('vae_export_digest')})"
        )
    return lines


def _conditions(extra: dict) -> list[str]:
    cond = _json_of(extra.get("conditions.json"))
    if "columns" in cond:
        vocab = cond.get("vocabularies", {})
        return [", ".join(_values(c, vocab.get(c, [])) for c in cond["columns"])]
    if "attribute" in cond:
        return [_values(cond["attribute"], cond.get("values", []))]
    labels = _json_of(extra.get("labels.json"))
    return [", ".join(_values(c, v) for c, v in labels.items())] if labels else []


def _values(attribute: str, values: list) -> str:
    return f"{attribute} ({len(values)} value{'' if len(values) == 1 else 's'})"


def _training_lines(prov: dict) -> list[str]:
    lines = [f"- steps: {prov.get('step', 'not recorded')}"]
    val = prov.get("val") or {}
    if not val:
        return [*lines, "- final validation metrics: none recorded"]
    lines += ["- final validation metrics:", "", "| metric | value |", "|---|---|"]
    return lines + [f"| {k} | {v:.6g} |" for k, v in val.items() if isinstance(v, int | float)]


def _load_lines(kind: str | None) -> list[str]:
    snippet = {
        "classifier": [
            "import atlasldm",
            'gen = atlasldm.load_pretrained("path/to/dit/export", classifiers=["path/to/this"])',
            'adata = gen.generate(conditions={"ATTR": "VALUE"}, n_cells=100, seed=0)',
        ],
        "vae": [
            "import atlasldm",
            'gen = atlasldm.load_pretrained("path/to/this/folder")  # VAE prior',
            "latents = gen.encode(adata)  # (cells, M, D)",
        ],
    }.get(
        kind or "",
        [
            "import atlasldm",
            'gen = atlasldm.load_pretrained("path/to/this/folder")  # finds its VAE export',
            'adata = gen.generate(conditions={"ATTR": "VALUE"}, n_cells=100, seed=0)',
        ],
    )
    plain = (
        "Without atlasldm: `safetensors.torch.load_file('model.safetensors')` holds the fp32 "
        "weights and `config.json` the model config (docs/api.md in the atlasldm repository)."
    )
    return ["```python", *snippet, "```", "", plain]
