"""End-to-end run on the built-in data: ``python launchers/e2e.py [--quick] [--root runs/e2e]``.

Ingest -> VAE -> DiT (+ the scDiffusion-style baseline) -> generate -> evaluate, then one table
comparing scLDM with its baselines, the real-vs-real floor and the known-bad references.
"""

import sys
from collections.abc import Sequence

from atlasldm.pipeline import e2e


def main(argv: Sequence[str] | None = None) -> None:
    """Run the pipeline with `argv` (default: the command line)."""
    e2e.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
