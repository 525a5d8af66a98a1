"""Train the noisy-latent classifier: `deepspeed launchers/train_classifier.py`.

Needs the VAE export of `train_vae.py`; `stage.attribute=cell_type` picks the label to classify.
"""

from collections.abc import Sequence

from atlasldm.train import classifier_stage
from atlasldm.train.cli import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    """Run the stage with `argv` (default: the command line); `--help` lists every config key."""
    run_stage(classifier_stage.main, argv)


if __name__ == "__main__":
    main()
