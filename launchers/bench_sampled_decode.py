"""Sampled-decode trade-off (issue #14): `python launchers/bench_sampled_decode.py`."""

import sys
from collections.abc import Sequence

from atlasldm.bench import sampled_decode


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sampled-decode benchmark with `argv` (default: the command line)."""
    return sampled_decode.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
