"""Train the noisy-latent classifier: `deepspeed launchers/train_classifier.py`.

Needs the VAE export of `train_vae.py`; `stage.attribute=cell_type` picks the label to classify.
"""

from atlasldm.train import classifier_stage
from atlasldm.train.cli import run_stage


def main() -> None:
    """Run the stage with the command-line arguments."""
    run_stage(classifier_stage.main)


if __name__ == "__main__":
    main()
