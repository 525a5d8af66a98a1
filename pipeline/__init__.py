"""Multi-stage workflows that drive the launchers end to end (ingest, train, generate, evaluate)."""
