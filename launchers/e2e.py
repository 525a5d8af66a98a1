"""End-to-end run on the built-in data: ``python launchers/e2e.py [--quick] [--root runs/e2e]``.

Ingest -> VAE -> DiT (+ the scDiffusion-style baseline) -> generate -> evaluate, then one table
comparing scLDM with its baselines, the real-vs-real floor and the known-bad references.
"""

import sys

from evaluation import e2e

if __name__ == "__main__":
    e2e.main(sys.argv[1:])
