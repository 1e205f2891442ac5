"""argparse help that explains itself: defaults shown, and the full help when a command is missing.

Kept apart from cli.py so that the parser's definitions read without the machinery.
"""

from __future__ import annotations

import argparse
import copy
import sys


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help where it has a default worth showing."""

    def _format_action(self, action):
        d, text = action.default, action.help or ""
        shown = not (text is argparse.SUPPRESS or "default" in text.lower() or action.nargs == 0
                     or d is None or d is argparse.SUPPRESS or d == [] or d == "")
        if shown:  # flags (nargs 0) default to off; None and [] mean "not given"
            action = copy.copy(action)
            action.help = f"{text} (default: %(default)s)".lstrip()
        return super()._format_action(action)


class HelpfulParser(argparse.ArgumentParser):
    """`DefaultsFormatter` for this parser and every subcommand parser made from it (argparse
    builds those with type(self)); a missing subcommand prints the full help, not just usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        commands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if commands and message.startswith("the following arguments are required") and \
                (commands[0].metavar or commands[0].dest) in message:
            self.print_help(sys.stderr)
            self.exit(2, f"\n{self.prog}: choose a command\n")
        super().error(message)
