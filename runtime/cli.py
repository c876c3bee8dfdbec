"""The ``edgeshift`` command. Device commands (inspect, bench, run, simulate) need only numpy and ONNX Runtime;
build commands (prune, export, report, ...) import torch inside their bodies, so this module imports on a device
without torch. ``python -m runtime`` runs the same CLI."""
from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .cli_util import echo_table, handle_errors

app = typer.Typer(
    name="edgeshift",
    help="Prune a CNN into exact, smaller ONNX variants; run and switch them on edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class PolicyName(str, Enum):
    qps_trend = "qps-trend"
    latency_slo = "latency-slo"
    memory = "memory"
    manual = "manual"


def _quiet_provider_warnings() -> None:
    warnings.simplefilter("once", RuntimeWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # one line, no source echo


@app.callback()
def _root() -> None:
    """Prune a CNN into exact, smaller ONNX variants; run and switch them on edge devices."""
    _quiet_provider_warnings()


@app.command("inspect")
@handle_errors
def inspect(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    verify: bool = typer.Option(True, help="Inflate every variant and check its sha256."),
) -> None:
    """Show a portfolio's manifest as a table (torch-free)."""
    from .inspect_cmd import print_portfolio

    print_portfolio(portfolio, verify)


@app.command("bench")
@handle_errors
def bench(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    profile: str = typer.Option("host", help="A device profile name (see `edgeshift profiles`) or a .toml path."),
    variant: Optional[list[str]] = typer.Option(None, help="Only these variants (repeatable)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results and fingerprint as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write one CSV row per variant."),
) -> None:
    """Measure every variant on this device: inflate, session creation, latency percentiles, throughput, RSS."""
    import device_profiles

    from .bench import BENCH_HEADER, bench_file, bench_rows, write_csv, write_json

    prof = device_profiles.get(profile)
    doc, results = bench_file(portfolio, prof, variant)
    fp = doc["fingerprint"]
    typer.echo(f"{portfolio} on {fp['machine']} {fp['cpu']} x{fp['cores']}, onnxruntime {fp['onnxruntime']}, "
               f"profile {prof.name} (batch {prof.serving.batch_size}, {prof.execution.intra_op_threads} threads)")
    echo_table(bench_rows(results), BENCH_HEADER)
    if json_out:
        write_json(json_out, doc)
        typer.echo(f"wrote {json_out}")
    if csv_out:
        write_csv(csv_out, results)
        typer.echo(f"wrote {csv_out}")


@app.command("run")
@handle_errors
def run(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    images: Path = typer.Option(..., "--images", help="A folder of images (jpg/png need Pillow; .npy do not)."),
    profile: str = typer.Option("host", help="A device profile name or a .toml path."),
    variant: Optional[str] = typer.Option(None, help="The variant to use (default: the median-size one)."),
    top: int = typer.Option(1, min=1, help="How many classes to print per image."),
    batch: int = typer.Option(16, min=1, help="Images per inference call."),
) -> None:
    """Classify a folder of images with one variant of a portfolio."""
    from .engine import Runtime
    from .run_images import classify_folder

    with Runtime(portfolio, profile=profile, start=variant) as rt:
        n = 0
        for path, best in classify_folder(rt, images, batch=batch, top=top):
            typer.echo(f"{path}\t" + "\t".join(f"{label} {p:.3f}" for label, p in best))
            n += 1
        s = rt.stats()
        typer.echo(f"{n} images with {rt.active}: p50 {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms per batch")


@app.command("simulate")
@handle_errors
def simulate_cmd(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    trace: Path = typer.Option(..., "--trace", help="CSV time_s,rps[,cpu_share][,available_mb] or JSON rows."),
    policy: PolicyName = typer.Option(PolicyName.qps_trend, help="The switch policy."),
    profile: str = typer.Option("host", help="A device profile name or a .toml path."),
    step: float = typer.Option(1.0, min=0.01, help="Seconds per simulated decision window."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write switches and totals as JSON."),
) -> None:
    """Replay a load trace against a policy; print every switch with its reason and measured cost."""
    import json

    import device_profiles

    from .atomic import write_text_atomic
    from .simulate import result_document, simulate_file

    res, lines = simulate_file(portfolio, trace, policy.value, device_profiles.get(profile), step)
    for line in lines:
        typer.echo(line)
    if json_out:
        write_text_atomic(json_out, json.dumps(result_document(res), indent=2))


@app.command("profiles")
@handle_errors
def profiles_cmd() -> None:
    """List the built-in device profiles."""
    import device_profiles

    rows = []
    for name in device_profiles.names():
        p = device_profiles.get(name)
        rows.append([name, ", ".join(p.execution.providers), str(p.execution.intra_op_threads),
                     f"{p.serving.latency_target_ms:g}", str(p.serving.memory_budget_mb)])
    echo_table(rows, ["profile", "providers (preferred first)", "threads", "target ms", "memory MB"])


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
