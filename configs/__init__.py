"""The shipped YAML recipes, installed as package data (`atlasldm.configs`).

Code finds a recipe with `config_path("e2e/vae.yaml")`, which works from a source checkout, an
editable install and a wheel alike; nothing looks for a `configs/` folder beside the code.
"""

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent


def config_path(name: str) -> Path:
    """The path of a shipped recipe, e.g. `config_path("vae.yaml")`; raise if there is none."""
    path = CONFIGS_DIR / name
    if not path.is_file():
        shipped = sorted(str(p.relative_to(CONFIGS_DIR)) for p in CONFIGS_DIR.rglob("*.yaml"))
        raise FileNotFoundError(f"no shipped config {name!r}; shipped: {', '.join(shipped)}")
    return path
