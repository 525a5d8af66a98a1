"""Benchmarks (loader, model, scale), installed as `atlasldm.bench`; the library never uses it."""
