"""Benchmark the models (issue #3): `python launchers/bench_model.py --preset census70m`."""

import sys

from atlasldm.bench import model


def main() -> int:
    """Run the model benchmark with the command-line arguments."""
    return model.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
