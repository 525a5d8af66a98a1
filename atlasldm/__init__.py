"""atlasldm: distributed training of single-cell latent diffusion models at atlas scale.

The repository keeps one folder per concern at its top level (`data/`, `models/`, `train/`, ...);
the installed distribution maps each of them under this namespace (`atlasldm.data` is `data/`,
and so on; see `[tool.setuptools]` in pyproject.toml), so nothing generic such as `train` or
`models` lands in site-packages.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("atlasldm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


__all__ = ["__version__", "load_pretrained"]


def __getattr__(name: str):
    """Import `load_pretrained` from `atlasldm.generation.api` on first access (PEP 562)."""
    if name == "load_pretrained":
        from atlasldm.generation.api import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'atlasldm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "load_pretrained"})
