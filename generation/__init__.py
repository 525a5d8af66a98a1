"""Generation from exported models: condition plans, guided latent sampling, NB decoding, writers.

Needs only `models/` and the export folders (no DeepSpeed, no GPU). `generation.api` is the
Python API (`atlasldm.load_pretrained`, `CellGenerator.generate` / `.encode`; docs/api.md);
`generation.cli` is the command line behind `atlasldm generate` and `launchers/generate.py`,
and runs the same code.
"""
