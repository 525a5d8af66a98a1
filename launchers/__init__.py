"""Thin command-line entry points, installed as `atlasldm.launchers` so that a wheel has them too.

Each is a script (`python launchers/train_vae.py`, `deepspeed launchers/train_vae.py`) and a
module (`python -m atlasldm.launchers.train_vae`); `LAUNCHERS_DIR` is where the scripts are.
"""

from pathlib import Path

LAUNCHERS_DIR = Path(__file__).resolve().parent
