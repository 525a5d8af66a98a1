"""Export a run's latest checkpoint: `python launchers/export.py RUN_DIR [key=value ...]`.

Writes `RUN_DIR/export/` (consolidated fp32 weights, EMA for the DiT, config.json, vocabularies,
side files) from the newest complete checkpoint, using the run's saved config.yaml; the stage
(VAE, DiT or classifier) is read from `RUN_DIR/stage`. Also runs under `deepspeed`/`torchrun`
(ZeRO-3 shards at another world size go through DeepSpeed's universal conversion).
"""

from __future__ import annotations

from collections.abc import Sequence

from atlasldm.train.cli import export_main


def main(argv: Sequence[str] | None = None) -> None:
    """Export the run folder named in `argv` (default: the command line); see `--help`."""
    export_main(argv)


if __name__ == "__main__":
    main()
