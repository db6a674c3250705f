"""The `capfilt` command line: parses and validates, then calls one function per command.

Every command turns an expected failure (bad path, unreadable image, unknown checkpoint layout,
bad config value) into one clear error line and exit status 1, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click


class CapfiltError(Exception):
    """An error the user can fix; printed as one line, exit status 1."""


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Expected errors become `error: ...` on stderr and exit 1; bugs still show a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CapfiltError, FileNotFoundError, ValueError, OSError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """capfilt: BLIP's CapFilt (captioner + filter) at web scale on Ray."""


# -- commands are added below, one block each ---------------------------------------------

if __name__ == "__main__":
    main()
