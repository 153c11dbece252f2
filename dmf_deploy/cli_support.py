"""What every dmf-* command shares: one error format, `--version`, and old option names kept as aliases.

The conventions (README.md, "Command-line conventions"):

- an error is one line on stderr, `dmf-NAME: error: MESSAGE` (usage errors print the usage first);
- `--version` prints `dmf-NAME VERSION`;
- `-q/--quiet` silences progress lines, `-v/--verbose` adds log detail;
- an option renamed for consistency keeps its old name as a hidden alias (`aliases=`).

A command opts in with `cls=DmfCommand` (or `DmfGroup`) and the `version_option(NAME)` decorator.
Torch-free: the runtime's commands use it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO, Any

import click

from dmf_deploy import __version__


class CliError(click.ClickException):
    """An expected failure of a command: printed as `dmf-NAME: error: MESSAGE`, exit status `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Prefixed(click.ClickException):
    """Any ClickException of a dmf command, shown in the one format."""

    def __init__(self, original: click.ClickException, prog: str) -> None:
        super().__init__(original.format_message())
        self.original, self.prog, self.exit_code = original, prog, original.exit_code

    def show(self, file: IO[Any] | None = None) -> None:
        file = file or sys.stderr
        usage = isinstance(self.original, click.UsageError)
        usage_ctx = getattr(self.original, "ctx", None) if usage else None
        if usage_ctx is not None:
            click.echo(usage_ctx.get_usage(), file=file, err=True)
            help_name = usage_ctx.help_option_names[0] if usage_ctx.help_option_names else "--help"
            click.echo(f"Try '{usage_ctx.command_path} {help_name}' for help.", file=file, err=True)
        click.echo(f"{self.prog}: error: {self.original.format_message()}", file=file, err=True)


def _root_name(ctx: click.Context | None, fallback: str) -> str:
    if ctx is None:
        return fallback
    return ctx.find_root().command.name or fallback


class _Conventions:
    """Mixin for click.Command and click.Group: the error format and hidden aliases."""

    aliases: dict[str, str]

    def __init__(self, *args: Any, aliases: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = dict(aliases or {})

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        try:
            return super().make_context(info_name, self._unalias(list(args)), parent=parent, **extra)
        except _Prefixed:
            raise
        except click.ClickException as exc:
            raise _Prefixed(exc, _root_name(parent, self.name or "dmf")) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _Prefixed:
            raise
        except click.ClickException as exc:
            raise _Prefixed(exc, _root_name(ctx, self.name or "dmf")) from None

    def _unalias(self, args: list[str]) -> list[str]:
        """Old option names replaced by their new ones (`--old`, `--old=VALUE`), up to a bare `--`."""
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            name, sep, value = arg.partition("=")
            out.append(self.aliases[name] + sep + value if name in self.aliases else arg)
        return out


class DmfCommand(_Conventions, click.Command):
    """A click.Command with the dmf conventions (see the module's docstring)."""


class DmfGroup(_Conventions, click.Group):
    """A click.Group with the dmf conventions; its subcommands should be DmfCommand too."""


def version_option(prog: str) -> Callable:
    """`--version`: prints `PROG VERSION` (the package's version) and exits."""
    return click.version_option(__version__, "--version", prog_name=prog, message="%(prog)s %(version)s")


def require_extra(extra: str, *modules: str) -> None:
    """CliError naming the extra to install when one of `modules` does not import."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or module
            raise CliError(
                f"needs the {extra} extra: pip install '.[{extra}]' ({missing} is not installed)", exit_code=2
            ) from None
