"""The ``edgeshift`` command: the device commands (``edgeshift.runtime.cli``), plus whatever command groups are
installed under the ``edgeshift.commands`` entry point (the build side registers ``prune``, ``export``, ...
there), so the device side never names the build side and a device install without it still runs.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

import typer

from edgeshift.runtime import cli as device_cli

COMMAND_GROUP = "edgeshift.commands"

app = typer.Typer(
    name="edgeshift",
    help="Prune a CNN into exact, smaller ONNX variants; run and switch them on edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _quiet_provider_warnings() -> None:
    warnings.simplefilter("once", RuntimeWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]


@app.callback()
def _root() -> None:
    """Prune a CNN into exact, smaller ONNX variants; run and switch them on edge devices."""
    _quiet_provider_warnings()


def _register_installed() -> None:
    device_cli.register(app)
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ModuleNotFoundError as exc:
            if exc.name and (ep.module == exc.name or ep.module.startswith(exc.name + ".")):
                continue  # that part of edgeshift is not installed here (a device): its commands are absent
            raise  # anything else is a bug in that part, not an absent install
        register(app)


_register_installed()


def main() -> None:
    app()
