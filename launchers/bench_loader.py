"""Benchmark the streaming loader against tiledbsoma-ml: `python launchers/bench_loader.py`."""

import sys

from atlasldm.bench import loader


def main() -> int:
    """Run the loader benchmark with the command-line arguments."""
    return loader.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
