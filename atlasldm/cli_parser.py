"""The argparse conventions of the `atlasldm` commands (docs/cli.md): every option's help shows
its default, a usage mistake is one line with exit code 2, and no option is matched by prefix
(so `--print` cannot silently mean `--print-config`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to every option's help; description and epilog printed as written."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`error: ...; see PROG --help`), exit 2."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        """Print the one-line error and exit 2 (argparse's code for a usage error)."""
        self.exit(2, f"error: {message}; see '{self.prog} --help'\n")

    def parse_mixed(self, argv: Sequence[str], rest: str) -> argparse.Namespace:
        """Parse `argv` whose positional arguments may come before and after the options; those
        after go to the list `rest` (the last positional, nargs="*"). Unlike
        `parse_intermixed_args`, --help then still shows that positional's default."""
        args, extra = self.parse_known_args(list(argv))
        unknown = [a for a in extra if a.startswith("-")]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        setattr(args, rest, [*getattr(args, rest), *extra])
        return args
