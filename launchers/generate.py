"""Generate cells from exported models: ``python launchers/generate.py --help``.

Needs neither DeepSpeed nor a GPU; ``torchrun --nproc_per_node N launchers/generate.py ...``
splits the batches over N processes.
"""

from generation import cli

if __name__ == "__main__":
    cli.main()
