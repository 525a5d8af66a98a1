"""A DeepSpeed CPU job for tests/faults/test_shm_cleanup.py (not collected by pytest).

Each rank starts the process group the way training does (`train.distributed.init_distributed`,
which maps DeepSpeed's shared-memory allreduce buffer under the deepspeed launcher), runs one
allreduce through it, writes its buffer path to READY_DIR/rank<R>, then either exits normally or,
with `hold`, sleeps until it is killed.

Usage: python -m deepspeed.launcher.runner --num_gpus 2 tests/faults/shm_job.py READY_DIR [hold]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from atlasldm.train.cli import end_process
from atlasldm.train.distributed import all_reduce_mean, init_distributed, shm_buffer_path


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's
    ready, hold = Path(args[0]), args[1:] == ["hold"]
    init_distributed()
    all_reduce_mean(torch.ones(4))
    rank = os.environ["RANK"]
    tmp = ready / f".rank{rank}.tmp"
    tmp.write_text(str(shm_buffer_path()))
    os.replace(tmp, ready / f"rank{rank}")
    while hold:
        time.sleep(1)


if __name__ == "__main__":
    main()
    end_process(0)  # as the launchers do: no interpreter finalization after the work is done
