"""The `atlasldm` command: one entry point whose subcommands are the launchers (docs/cli.md).

`atlasldm train-vae ARGS` runs exactly what `python launchers/train_vae.py ARGS` runs: the
launcher's `main`, with the arguments after the subcommand. A launcher is imported only when its
command runs, so `atlasldm --help` answers at once. Under the deepspeed launcher, which starts a
script or a module, use `deepspeed launchers/train_vae.py` or
`deepspeed --module atlasldm.launchers.train_vae`; torchrun runs the console script itself with
`torchrun --no-python ... atlasldm train-vae`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from atlasldm import __version__
from atlasldm.cli_parser import Parser

# command -> (module under atlasldm.launchers, one line for `atlasldm --help`)
COMMANDS = {
    "ingest": ("ingest", "build a training copy from an h5ad, a SOMA experiment or Census"),
    "train-vae": ("train_vae", "train the VAE (stage 1)"),
    "train-dit": ("train_dit", "train the latent denoiser (stage 2) on a VAE export"),
    "train-classifier": ("train_classifier", "train a noisy-latent classifier for guidance"),
    "export": ("export", "export a run's newest checkpoint to RUN_DIR/export/"),
    "generate": ("generate", "generate cells from exported models"),
    "evaluate": ("evaluate", "evaluate generated cells against real data"),
    "e2e": ("e2e", "end-to-end run: ingest, train, generate, evaluate on built-in data"),
    "scale-study": ("scale_study", "synthetic scale study: gap to a known truth vs corpus size"),
    "bench-loader": ("bench_loader", "benchmark the streaming loader against tiledbsoma-ml"),
    "bench-model": ("bench_model", "benchmark the models: parameters, FLOPs, speed, memory"),
    "bench-scale": ("bench_scale", "scale benchmark of the data path (sampler, streams, N)"),
}


def build_parser() -> Parser:
    """`atlasldm --help`: one line per command; a command's own --help has its options."""
    parser = Parser(
        prog="atlasldm",
        description="Distributed training of single-cell latent diffusion models (scLDM).",
        epilog="Run 'atlasldm COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"atlasldm {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for name, (_, line) in COMMANDS.items():
        commands.add_parser(name, help=line, add_help=False)
    return parser


def run_command(name: str, argv: Sequence[str]) -> int:
    """Run the launcher of command `name` with `argv`; return its exit status."""
    module = importlib.import_module(f"atlasldm.launchers.{COMMANDS[name][0]}")
    sys.argv = [f"atlasldm {name}", *argv]  # usage lines name the command as typed
    status = module.main(list(argv))
    return status if isinstance(status, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `atlasldm COMMAND [ARGS]` (default: the command line); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return run_command(args[0], args[1:])
    parser = build_parser()
    parser.parse_args(args)  # --help and --version exit 0, an unknown command exits 2
    parser.print_help(sys.stderr)  # no command given
    return 2


if __name__ == "__main__":
    sys.exit(main())
