"""Benchmark the streaming loader against its peers: `python launchers/bench_loader.py`."""

import sys
from collections.abc import Sequence

from atlasldm.bench import loader_sweep


def main(argv: Sequence[str] | None = None) -> int:
    """Run the loader benchmark with `argv` (default: the command line)."""
    return loader_sweep.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
