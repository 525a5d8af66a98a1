"""Train the latent denoiser (stage 2): `deepspeed launchers/train_dit.py [configs/*.yaml] [k=v]`.

Needs the VAE export of `train_vae.py` (default run folder runs/vae). Also runs under
`torchrun --nproc_per_node N` and `accelerate launch --multi_gpu --num_processes N`.
"""

from atlasldm.train import dit_stage
from atlasldm.train.cli import run_stage


def main() -> None:
    """Run the stage with the command-line arguments."""
    run_stage(dit_stage.main)


if __name__ == "__main__":
    main()
