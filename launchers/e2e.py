"""End-to-end run on the built-in data: ``python launchers/e2e.py [--quick] [--root runs/e2e]``.

Ingest -> VAE -> DiT (+ the scDiffusion-style baseline) -> generate -> evaluate, then one table
comparing scLDM with its baselines, the real-vs-real floor and the known-bad references.
"""

import sys

from atlasldm.pipeline import e2e


def main() -> None:
    """Run the pipeline with the command-line arguments."""
    e2e.main(sys.argv[1:])


if __name__ == "__main__":
    main()
