"""Scale benchmark of the data path (sampler sweep, multi-rank stream timing, flatness in N):
`python launchers/bench_scale.py --help`."""

import sys

from atlasldm.bench import scale


def main() -> int:
    """Run the scale benchmark with the command-line arguments."""
    return scale.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
