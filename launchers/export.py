"""Export a run's latest checkpoint: `python launchers/export.py RUN_DIR [key=value ...]`.

Writes `RUN_DIR/export/` (consolidated fp32 weights, EMA for the DiT, config.json, vocabularies,
side files) from the newest complete checkpoint, using the run's saved config.yaml; the stage
(VAE, DiT or classifier) is read from `RUN_DIR/stage`. Also runs under `deepspeed`/`torchrun`
(ZeRO-3 shards at another world size go through DeepSpeed's universal conversion).
"""

from __future__ import annotations

import sys
from pathlib import Path

from atlasldm.train import classifier_stage, dit_stage, vae_stage
from atlasldm.train.cli import run_stage

STAGES = {
    "vae": vae_stage.main,
    "dit": dit_stage.main,
    "classifier": classifier_stage.main,
}


def main() -> None:
    """Parse argv, pick the run's stage and export its latest checkpoint."""
    args = [a for a in sys.argv[1:] if not a.startswith("--local")]
    if not args:
        sys.exit("usage: python launchers/export.py RUN_DIR [key=value ...]")
    run_dir = Path(args[0])
    stage_file = run_dir / "stage"
    if not stage_file.is_file():
        sys.exit(f"error: {run_dir} is not a run folder (no 'stage' file); train it first")
    stage = stage_file.read_text().strip()
    overrides = [f"run.root={run_dir.parent}", f"run.name={run_dir.name}", *args[1:]]
    config = [str(run_dir / "config.yaml"), *overrides]
    run_stage(lambda _argv: STAGES[stage](config, export_only=True))


if __name__ == "__main__":
    main()
