"""Build a training copy: `python launchers/ingest.py --source SRC --out DIR [...]`.

See data/ingest.py for the options and data/sources.py for the source strings.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from atlasldm.data.ingest import main as ingest_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ingest command with argv (default: sys.argv[1:])."""
    return ingest_main(argv)


if __name__ == "__main__":
    sys.exit(main())
