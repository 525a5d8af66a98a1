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
