"""Train the latent denoiser (stage 2): `deepspeed launchers/train_dit.py [configs/*.yaml] [k=v]`.

Needs the VAE export of `train_vae.py` (default run folder runs/vae). Also runs under
`torchrun --nproc_per_node N` and `accelerate launch --multi_gpu --num_processes N`.
"""

from collections.abc import Sequence

from atlasldm.train import dit_stage
from atlasldm.train.cli import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    """Run the stage with `argv` (default: the command line); `--help` lists every config key."""
    run_stage(dit_stage.main, argv)


if __name__ == "__main__":
    main()
