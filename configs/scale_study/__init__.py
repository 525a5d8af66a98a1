"""Recipes of the synthetic scale study (`python launchers/scale_study.py`)."""
