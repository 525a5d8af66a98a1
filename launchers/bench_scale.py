"""Scale benchmark of the data path (sampler sweep, multi-rank stream timing, flatness in N):
`python launchers/bench_scale.py --help`."""

import sys
from collections.abc import Sequence

from atlasldm.bench import scale


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scale benchmark with `argv` (default: the command line)."""
    return scale.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
