"""Build a training copy: `python launchers/ingest.py --source SRC --out DIR [...]`."""

import sys

from data.ingest import main

if __name__ == "__main__":
    sys.exit(main())
