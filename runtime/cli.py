"""The ``edgeshift`` command. Device commands need only numpy and ONNX Runtime; build commands (prune, export,
...) import torch inside their bodies, so this module imports on a device without torch."""
from __future__ import annotations

from pathlib import Path

import typer

from .cli_util import handle_errors

app = typer.Typer(
    name="edgeshift",
    help="Prune a CNN into exact, smaller ONNX variants; run and switch them on edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Prune a CNN into exact, smaller ONNX variants; run and switch them on edge devices."""


@app.command("inspect")
def inspect(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    verify: bool = typer.Option(True, help="Inflate every variant and check its sha256."),
) -> None:
    """Show a portfolio's manifest as a table (torch-free)."""
    from .inspect_cmd import print_portfolio

    handle_errors(print_portfolio)(portfolio, verify)


def _register() -> None:
    from exporter import cli as exporter_cli
    from pruner import cli as pruner_cli

    pruner_cli.register(app)
    exporter_cli.register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
