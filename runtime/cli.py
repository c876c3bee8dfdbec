"""The ``edgeshift`` command. Device commands need only numpy and ONNX Runtime; build commands (prune, export,
...) import torch inside their bodies, so this module imports on a device without torch."""
from __future__ import annotations

import typer

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


def _register() -> None:
    from pruner import cli as pruner_cli

    pruner_cli.register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
