"""The one typer application every command module registers on (`@app.command(...)`).

Kept tiny and import-light so `dsv4 --help` stays instant: command modules import their heavy
dependencies inside the command functions.
"""
from __future__ import annotations

import typer

app = typer.Typer(
    name="dsv4",
    help="dsv4: DeepSeek V4 Flash inference engine for GGUF files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
