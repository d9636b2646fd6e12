"""Fenced code blocks of the README and docs/, and a click parse of each `cascade ...` line in them.

Shared by tests/test_readme.py and tests/test_docs.py.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import click

ROOT = pathlib.Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)


def blocks(path: pathlib.Path, language: str | None = None) -> list[str]:
    """The fenced code blocks of a markdown file (indentation removed), optionally of one language."""
    found = []
    for indent, lang, body in FENCE.findall(path.read_text()):
        if language is None or lang == language:
            found.append("\n".join(line[len(indent):] for line in body.splitlines()) + "\n")
    return found


def python_block(path: pathlib.Path, marker: str) -> str:
    """The one Python block of ``path`` that contains ``marker``."""
    (code,) = [b for b in blocks(path, "python") if marker in b]
    return code


def command_lines(path: pathlib.Path) -> list[list[str]]:
    """Every `cascade ...` command of the shell and plain blocks, continuation lines joined, as argv.

    Comments are dropped; a command written with `...` (elided arguments) is left out, since it is
    not meant to run as written.
    """
    commands = []
    for block in [b for b in blocks(path) if b] :
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            for part in re.split(r"&&|;", line):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if len(words) > 1 and words[0] == "cascade" and "..." not in words:
                    commands.append(words[1:])
    return commands


def parse(argv: list[str]) -> click.Command:
    """Parse ``cascade ARGV`` with the real click commands, without running callbacks or the command.

    Raises click.UsageError for an unknown command or option, a missing option value, a surplus
    argument, or a value outside a choice or not a number. Paths and model names are not checked
    (the docs use placeholders such as MODEL and OUT).
    """
    from cascade.cli import app

    command, ctx, args = app, click.Context(app, info_name="cascade"), list(argv)
    while True:
        values, rest, _ = command.make_parser(ctx).parse_args(args)
        for param in command.params:
            value = values.get(param.name)
            if value is not None and isinstance(param.type, (click.Choice, click.types.IntParamType,
                                                             click.types.FloatParamType)):
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    param.type.convert(item, param, ctx)
        if not isinstance(command, click.Group):
            if rest:
                raise click.UsageError(f"unexpected extra arguments {rest}")
            return command
        if not rest:
            raise click.UsageError("missing a subcommand")
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            raise click.UsageError(f"no such command {rest[0]!r}")
        command, ctx, args = sub, click.Context(sub, info_name=rest[0], parent=ctx), rest[1:]
