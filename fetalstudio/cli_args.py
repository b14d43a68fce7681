"""The plumbing every command shares: how a command is registered, and its argument types.

Registering: a command module defines ``COMMAND = Command(name, help, add_arguments, run)`` (``run``
returns the exit code; a FetalStudioError it raises becomes ``error: ...`` and exit code 2 in
``fetalstudio.cli.main``), and ``fetalstudio.cli.commands()`` lists it once, at the top level or in
a :class:`CommandGroup` (``train``, ``eval``). Keep a command module's top-level imports light:
heavy libraries are imported in ``run``, so ``--help`` stays fast.

Argument types: one kind of bad value gets one message everywhere. argparse reports a refused value
as ``<prog>: error: argument --batch-size: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    """One sub-command: ``python -m fetalstudio <name>`` or ``python -m fetalstudio <group> <name>``."""

    name: str
    help: str  # the one line in the parent's command list
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None  # the text of ``<name> --help`` (usually the module docstring)
    formatter_class: type[argparse.HelpFormatter] = argparse.RawDescriptionHelpFormatter

    def register(self, subparsers) -> argparse.ArgumentParser:
        """Add this command to ``subparsers`` (from ``add_subparsers``); the parsed namespace's ``handler`` is ``run``."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description,
                                       formatter_class=self.formatter_class)
        self.add_arguments(parser)
        parser.set_defaults(handler=self.run)
        return parser


@dataclass(frozen=True)
class CommandGroup:
    """Commands under one word, e.g. ``train sd`` and ``train lora``."""

    name: str
    help: str
    commands: tuple[Command, ...]
    #: Runs when no sub-command is named (``flex --image ...`` beside ``flex presets``); its options
    #: are the group's own. None: one of ``commands`` must be named.
    default: Command | None = None

    def register(self, subparsers) -> argparse.ArgumentParser:
        if self.default is None:
            parser = subparsers.add_parser(self.name, help=self.help, description=self.help)
        else:
            parser = subparsers.add_parser(self.name, help=self.help, description=self.default.description or self.help,
                                           formatter_class=self.default.formatter_class)
            self.default.add_arguments(parser)
            parser.set_defaults(handler=self.default.run)
        group = parser.add_subparsers(dest=f"{self.name}_command", required=self.default is None)
        for command in self.commands:
            command.register(group)
        return parser


def at_least_one(text: str) -> int:
    """A count such as ``--batch-size``: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def output_folder(text: str) -> Path:
    """An ``--out`` folder: it may exist (as a folder) or not yet; an existing file is refused."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; give a folder path (it is created if missing)")
    return path


def device_name(text: str) -> str:
    """A ``--device`` this machine has (cpu, cuda, cuda:N, mps); the message lists what is available."""
    from fetalstudio.errors import FetalStudioError
    from fetalstudio.models.device import checked_device

    try:
        return str(checked_device(text, source=""))
    except FetalStudioError as error:
        raise argparse.ArgumentTypeError(str(error).strip()) from None
