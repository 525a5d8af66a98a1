"""Evaluate generated cells against real data: ``python launchers/evaluate.py --help``."""

import sys
from collections.abc import Sequence

from atlasldm.evaluation import cli


def main(argv: Sequence[str] | None = None) -> None:
    """Run the evaluation with `argv` (default: the command line)."""
    cli.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
