"""Benchmark the streaming loader against tiledbsoma-ml: `python launchers/bench_loader.py`."""

import sys

from atlasldm.data import benchmark


def main() -> int:
    """Run the loader benchmark with the command-line arguments."""
    return benchmark.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
