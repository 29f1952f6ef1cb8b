"""Command-line flags accept both spellings: ``--save_path`` and ``--save-path``.

Wan's official scripts, musubi-tuner and the request's field names use underscores; web-server
tools usually use hyphens. Every parser of this project is a :class:`FlagParser`: options are
declared and shown in ``--help`` with underscores (one style), and a long option typed with
hyphens is read as the same option. Only tokens naming a declared option are rewritten, so a
value that happens to start with ``--`` is left to argparse as before.
"""

from __future__ import annotations

import argparse


def underscored(flag: str) -> str:
    """``--server-port`` -> ``--server_port``; ``--server-port=80`` keeps its value untouched."""
    name, eq, value = flag.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reads ``--a-b`` as ``--a_b`` when ``--a_b`` is one of its options.

    Subparsers made through ``add_subparsers`` are FlagParsers too (argparse makes them of the
    parent's class), and each respells the arguments it is handed.
    """

    def parse_known_args(self, args=None, namespace=None):
        import sys
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args([self._respell(a) for a in args], namespace)

    def _respell(self, token: str) -> str:
        if not isinstance(token, str) or not token.startswith("--") or "-" not in token[2:].partition("=")[0]:
            return token
        candidate = underscored(token)
        return candidate if candidate.partition("=")[0] in self._option_string_actions else token

