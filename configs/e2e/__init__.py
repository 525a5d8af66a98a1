"""End-to-end recipes (the scLDM and baseline stages of `python launchers/e2e.py`)."""
