"""Train the VAE (stage 1): `deepspeed launchers/train_vae.py [configs/*.yaml ...] [key=value ...]`.

Runs with no arguments (reference-default VAE on the built-in pbmc68k copy). Also runs under
`torchrun --nproc_per_node N` and `accelerate launch --num_processes N`; the deepspeed launcher's
`--local_rank` argument is ignored.
"""

from __future__ import annotations

import sys

from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.export import ExportError
from train.vae_stage import main as stage_main


def main() -> None:
    """Parse argv and run the stage; configuration problems exit with a one-line message."""
    try:
        stage_main(sys.argv[1:])
    except (ConfigError, CheckpointError, ExportError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
