"""Generate cells from exported models: ``python launchers/generate.py --help``.

Needs neither DeepSpeed nor a GPU; ``torchrun --nproc_per_node N launchers/generate.py ...``
splits the batches over N processes.
"""

import sys
from collections.abc import Sequence

from atlasldm.generation import cli


def main(argv: Sequence[str] | None = None) -> None:
    """Run generation with `argv` (default: the command line)."""
    cli.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
