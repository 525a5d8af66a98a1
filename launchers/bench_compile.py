"""Benchmark torch.compile (issue #14): `python launchers/bench_compile.py [--quick]`."""

import sys
from collections.abc import Sequence

from atlasldm.bench import compile as compile_bench


def main(argv: Sequence[str] | None = None) -> int:
    """Run the compile benchmark with `argv` (default: the command line)."""
    return compile_bench.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
