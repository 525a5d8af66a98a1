"""Benchmark the models (issue #3): `python launchers/bench_model.py --preset census70m`."""

import sys
from collections.abc import Sequence

from atlasldm.bench import model


def main(argv: Sequence[str] | None = None) -> int:
    """Run the model benchmark with `argv` (default: the command line)."""
    return model.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
