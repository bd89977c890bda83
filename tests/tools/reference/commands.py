"""The command-line reference: every `meshgress` command and subcommand with its usage line
and each argument's help, read from the argparse parser the CLI builds
(`meshgress.cli.build_parser`, which takes the agent's and the gateway's options from
nodeagent/options.py and gateway/options.py).

The usage lines are composed here rather than by argparse's formatter, whose layout follows
the terminal's width and changes between Python releases. Help texts are expanded as
argparse expands them (`%(default)s`). Defaults that some commands read from the
environment ($MESHGRESS_DATASTORE, ...) are whatever the parser was built with: build it
in an environment without them (`parser_without_environment`) for a reference that does not
depend on the shell it was generated in.

Purely computational, but for `parser_without_environment`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePath

from tests.tools.reference.markdown import code, inline, paragraphs, wrap

USAGE_WIDTH = 88


@dataclass(frozen=True)
class Argument:
    """One positional or option of a command."""

    names: str
    """How it is written in the list: `-o, --format {dot,svg,png}`, `NAMESPACE/NAME`."""
    usage: str
    """How it is written in the usage line: `[-o {dot,svg,png}]`."""
    help: str
    default: str | None
    """Shown only where the help text does not already say it."""
    positional: bool


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    summary: str
    """The help its parent lists it with."""
    description: str
    arguments: tuple[Argument, ...]
    subcommands: tuple[Command, ...]

    @property
    def name(self) -> str:
        return " ".join(self.words)


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if isinstance(action.metavar, tuple):
        return " ".join(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(choice) for choice in action.choices) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _values(action: argparse.Action) -> str:
    """What follows the flag (or stands for the positional) in a usage line."""
    metavar = _metavar(action)
    nargs = action.nargs
    if nargs == 0:
        return ""
    if nargs is None:
        return metavar
    if nargs == argparse.OPTIONAL:
        return f"[{metavar}]"
    if nargs == argparse.ZERO_OR_MORE:
        return f"[{metavar} ...]"
    if nargs == argparse.ONE_OR_MORE:
        return f"{metavar} [{metavar} ...]"
    if nargs == argparse.REMAINDER:
        return metavar if action.metavar else "..."
    if isinstance(nargs, int):
        return " ".join([metavar] * nargs)
    raise ValueError(f"{action.dest}: nargs {nargs!r} is not described")


def _expand_help(action: argparse.Action, prog: str) -> str:
    """The help text with argparse's %-placeholders filled in, as `--help` shows it."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = {key: value for key, value in vars(action).items()
              if value is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(choice) for choice in params["choices"])
    return " ".join((action.help % params).split())


def _shown_default(action: argparse.Action, help_text: str) -> str | None:
    default = action.default
    if (action.nargs == 0 or action.required or default is None
            or default is argparse.SUPPRESS or default in ((), [], "")
            or "default" in help_text.lower()):
        return None
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, list | tuple):
        return ",".join(str(item) for item in default)
    if isinstance(default, PurePath | str | int):
        return str(default)
    raise ValueError(f"{action.dest}: default {default!r} has no written form")


def _argument(action: argparse.Action, prog: str) -> Argument:
    values = _values(action)
    if action.option_strings:
        names = ", ".join(action.option_strings) + (f" {values}" if values else "")
        usage = action.option_strings[0] + (f" {values}" if values else "")
        if not action.required:
            usage = f"[{usage}]"
    else:
        names = usage = values
    help_text = _expand_help(action, prog)
    return Argument(names, usage, help_text, _shown_default(action, help_text),
                    positional=not action.option_strings)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[
        argparse.ArgumentParser] | None:
    found = [action for action in parser._actions
             if isinstance(action, argparse._SubParsersAction)]
    return found[0] if found else None


def command_tree(parser: argparse.ArgumentParser, words: tuple[str, ...] | None = None,
                 summary: str = "") -> Command:
    """The command `parser` parses (named `words`, by default its prog) and, depth first,
    every subcommand under it."""
    words = words or (parser.prog,)
    prog = " ".join(words)
    arguments = tuple(_argument(action, prog) for action in parser._actions
                      if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction))
    subcommands: list[Command] = []
    sub = _subparsers(parser)
    if sub is not None:
        for choice in sub._choices_actions:
            subcommands.append(command_tree(sub.choices[choice.dest], (*words, choice.dest),
                                            _expand_help(choice, prog)))
    return Command(words, summary, parser.description or "", arguments, tuple(subcommands))


def usage(command: Command, width: int = USAGE_WIDTH) -> list[str]:
    """The usage line as argparse orders it (options, then positionals), wrapped between
    arguments, continuation lines indented."""
    parts = [a.usage for a in command.arguments if not a.positional]
    parts += [a.usage for a in command.arguments if a.positional]
    if command.subcommands:
        parts.append("COMMAND ...")
    lines = [command.name]
    for part in parts:
        if len(lines[-1]) + 1 + len(part) > width and lines[-1].strip():
            lines.append("    " + part)
        else:
            lines[-1] += " " + part
    return lines


def _sentence(text: str) -> str:
    """A help fragment ("build the lab") as a sentence ("Build the lab.")."""
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?", ":")) else text + "."


def render_command(command: Command) -> list[str]:
    lines = [f"#### {command.name}", ""]
    if command.summary:
        lines += [*wrap(inline(_sentence(command.summary))), ""]
    for paragraph in paragraphs(command.description):
        lines += [*wrap(inline(paragraph)), ""]
    lines += ["```text", *usage(command), "```"]
    if command.arguments:
        lines.append("")
        for argument in command.arguments:
            text = argument.help
            if argument.default is not None:
                text = f"{text} (default {code(argument.default)})" if text \
                    else f"default {code(argument.default)}"
            first = f"- {code(argument.names)}" + (": " if text else "")
            lines += wrap(inline(text), first=first, indent="  ")
    if command.subcommands:
        lines += ["", "Commands:", ""]
        for sub in command.subcommands:
            lines += wrap(inline(sub.summary), first=f"- {code(sub.words[-1])}: ", indent="  ")
    return lines


def _walk(command: Command) -> Iterator[Command]:
    yield command
    for sub in command.subcommands:
        yield from _walk(sub)


def render_cli_reference(parser: argparse.ArgumentParser) -> str:
    """Every command, depth first in the order the parser declares them."""
    root = command_tree(parser)
    lines = wrap("Every command also takes `-h`/`--help`.")
    for command in _walk(root):
        lines += ["", *render_command(command)]
    return "\n".join(lines) + "\n"


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Commands and arguments without a help text, as `meshgress lab up --nodes`."""
    missing = []
    for command in _walk(command_tree(parser)):
        if len(command.words) > 1 and not command.summary:
            missing.append(command.name)
        missing += [f"{command.name} {argument.names}" for argument in command.arguments
                    if not argument.help]
    return missing


@contextmanager
def _environment_without(prefix: str) -> Iterator[None]:
    saved = {key: value for key, value in os.environ.items() if key.startswith(prefix)}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def parser_without_environment(build: Callable[[], argparse.ArgumentParser]
                               ) -> argparse.ArgumentParser:
    """The parser `build` makes while no $MESHGRESS_* variable is set, so defaults taken
    from the environment are those of a fresh shell."""
    with _environment_without("MESHGRESS_"):
        return build()
