"""The --help layout of every entry point; standard library only, so the light client can use it too."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; "(default: ...)" after options whose default says something.

    An option whose help already states its default (with "default" in the text) gets none added,
    so no default is said twice.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        says = action.default not in (None, False, argparse.SUPPRESS)
        if "%(default)" not in text and "default" not in text and action.option_strings and says:
            text += " (default: %(default)s)"
        return text
