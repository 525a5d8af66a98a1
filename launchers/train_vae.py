"""Train the VAE (stage 1): `deepspeed launchers/train_vae.py [configs/*.yaml ...] [key=value ...]`.

Runs with no arguments (reference-default VAE on the built-in pbmc68k copy). Also runs under
`torchrun --nproc_per_node N` and `accelerate launch --multi_gpu --num_processes N`; the deepspeed
launcher's `--local_rank` argument is ignored.
"""

from collections.abc import Sequence

from atlasldm.train import vae_stage
from atlasldm.train.cli import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    """Run the stage with `argv` (default: the command line); `--help` lists every config key."""
    run_stage(vae_stage.main, argv)


if __name__ == "__main__":
    main()
