"""Build-side commands (need the ``build`` extra). Only typer is imported at module level."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from runtime.cli_util import handle_errors


class PruneMode(str, Enum):
    exact = "exact"
    drop = "drop"


def _check_output(path: Path, force: bool) -> None:
    from runtime.errors import InputFileError, OutputExistsError

    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise InputFileError(f"output directory does not exist: {path.parent}")


def prune(
    checkpoint: Path = typer.Argument(..., help="An edgeshift checkpoint of a (sparse) zoo model."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the pruned checkpoint."),
    mode: PruneMode = typer.Option(PruneMode.exact, help="exact: never change outputs; drop: the published rule."),
    batch: int = typer.Option(2, help="Batch size of the random example inputs used to verify the prune."),
    seed: int = typer.Option(0, help="Seed of the example inputs."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
) -> None:
    """Remove every channel of a sparse model that cannot change its output; print the report."""
    from pruner.prune_cmd import prune_checkpoint

    _check_output(out, force)
    if json_out is not None:
        _check_output(json_out, force)
    report = prune_checkpoint(checkpoint, out, mode=mode.value, batch=batch, seed=seed)
    typer.echo(report.table())
    if json_out is not None:
        from runtime.atomic import write_text_atomic

        write_text_atomic(json_out, json.dumps(report.to_dict(), indent=2))
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("prune")(handle_errors(prune))
