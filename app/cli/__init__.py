"""`threadgate serve | dev | post | attach | runs | run | messages | cancel | adopt`: the pod,
the embedded stack, and a client for people and scripts.

The client commands print one line to stderr on failure and exit with a documented status
(README, "The CLI"): see `EXIT`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import typing

from . import commands, dev, serve
from .commands import DEFAULT_URL, URLS_FILE, find_urls_file, parse_option, resolve_urls
from .exits import (
    EXIT,
    FAILED,
    OK,
    REFUSED,
    RUN_ERROR,
    RUN_STOPPED,
    SERVER_ERROR,
    UNREACHABLE,
    USAGE,
    CliError,
)

__all__ = [
    "DEFAULT_URL",
    "EXIT",
    "FAILED",
    "OK",
    "REFUSED",
    "RUN_ERROR",
    "RUN_STOPPED",
    "SERVER_ERROR",
    "UNREACHABLE",
    "URLS_FILE",
    "USAGE",
    "CliError",
    "find_urls_file",
    "main",
    "parse_option",
    "parser",
    "resolve_urls",
]


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr too, like every other error (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(USAGE, f"threadgate: {message} (see: {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="threadgate",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="exit statuses: " + "; ".join(f"{k} {v}" for k, v in EXIT.items()),
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="run one pod, configured by the environment",
        description=textwrap.fill(
            "Run one pod (one uvicorn worker), configured by environment variables. "
            "PostgreSQL and NATS that do not answer stop the start within seconds (exit 3), "
            "naming the setting and the address tried.",
            88,
        ),
        epilog=serve.settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).set_defaults(fn=serve.serve)
    dev.add_parser(sub)
    commands.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        status = args.fn(args)
    except CliError as exc:
        print(f"threadgate: {exc}", file=sys.stderr)
        status = exc.status
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
