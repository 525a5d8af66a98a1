"""Generation from exported models: condition plans, guided latent sampling, NB decoding, writers.

Needs only `models/` and the export folders (no DeepSpeed, no GPU); `generation.cli` is the
command line behind `launchers/generate.py`.
"""
