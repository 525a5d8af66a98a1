"""Evaluate generated cells against real data: ``python launchers/evaluate.py --help``."""

from evaluation.cli import main

if __name__ == "__main__":
    main()
