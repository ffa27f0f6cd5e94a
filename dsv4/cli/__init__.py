"""Command-line entry point: the shared typer `app` plus `main()`, which turns any DsvError into
`error: <message>` on stderr with its exit code (2) and no traceback unless DSV4_DEBUG=1.

Adding a command module is one import line below; the module decorates functions with
`@app.command(...)` on the app from `app.py`. Holds no model logic.
"""
from __future__ import annotations

import sys

from .app import app

# Command modules: each registers its commands on `app` when imported.
from . import model_cmds  # noqa: E402,F401  make-tiny, inspect
from . import chat_cmds  # noqa: E402,F401  chat, run
from . import quant_cmds  # noqa: E402,F401  quantize, imatrix, quality
from . import bench_cmds  # noqa: E402,F401  bench

EXIT_INTERRUPTED = 130


def _click_errors() -> tuple:
    """ClickException classes to catch: typer >= 0.26 vendors its own copy of click next to the real one."""
    import click

    classes = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as vendored  # type: ignore[import-not-found]

        classes.append(vendored.ClickException)
    except ImportError:
        pass
    return tuple(classes)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit status (the console script passes it to sys.exit)."""
    import click

    from ..errors import DsvError

    try:
        rv = app(args=argv, prog_name="dsv4", standalone_mode=False)
    except DsvError as e:
        from .. import settings

        if settings.debug():
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except _click_errors() as e:  # usage errors: click prints them with its own exit code
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return rv if isinstance(rv, int) else 0
