"""Train the latent denoiser (stage 2): `deepspeed launchers/train_dit.py [configs/*.yaml] [k=v]`.

Needs the VAE export of `train_vae.py` (default run folder runs/vae). Also runs under
`torchrun --nproc_per_node N` and `accelerate launch --num_processes N`; the deepspeed launcher's
`--local_rank` argument is ignored.
"""

from __future__ import annotations

import sys

from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.dit_stage import main as stage_main
from train.export import ExportError


def main() -> None:
    """Parse argv and run the stage; configuration problems exit with a one-line message."""
    try:
        stage_main(sys.argv[1:])
    except (ConfigError, CheckpointError, ExportError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
