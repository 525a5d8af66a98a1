"""Generate cells from exported models: ``python launchers/generate.py --help``.

Needs neither DeepSpeed nor a GPU; ``torchrun --nproc_per_node N launchers/generate.py ...``
splits the batches over N processes.
"""

import sys

from atlasldm.generation import cli


def main() -> None:
    """Run generation with the command-line arguments."""
    cli.main(sys.argv[1:])


if __name__ == "__main__":
    main()
