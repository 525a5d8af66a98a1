"""Evaluate generated cells against real data: ``python launchers/evaluate.py --help``."""

import sys

from atlasldm.evaluation import cli


def main() -> None:
    """Run the evaluation command line on this process's arguments."""
    cli.main(sys.argv[1:])


if __name__ == "__main__":
    main()
