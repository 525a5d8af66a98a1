"""Synthetic scale study: ``python launchers/scale_study.py [--sizes 5000,20000,50000]
[--root runs/scale_study] [--quick]``.

Ingest synthetic corpora of each size -> VAE -> DiT -> generate -> one evaluation against fresh
truth cells, then one table of each size's gap to the truth-vs-truth floor (issue #15, part 4).
"""

import sys
from collections.abc import Sequence

from atlasldm.pipeline import scale_study


def main(argv: Sequence[str] | None = None) -> None:
    """Run the study with `argv` (default: the command line)."""
    scale_study.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
