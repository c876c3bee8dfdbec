"""The device commands: inspect, bench, run, simulate, profiles. They need only numpy and ONNX Runtime, so they
run on a device without torch; ``edgeshift.cli`` adds them to the ``edgeshift`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeshift import device_profiles
from edgeshift.core.commands import handle_errors
from edgeshift.core.errors import EdgeshiftError
from edgeshift.core.tables import echo_table
from edgeshift.core.text import printable

from . import policies


def inspect(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    verify: bool = typer.Option(
        True, help="Check every variant's sha256 and load and run each once, bounded by the profile's limits."
    ),
    profile: str = typer.Option("host", help="A device profile name or a .toml path (its [limits] apply)."),
) -> None:
    """Show a portfolio's manifest as a table (torch-free); exit non-zero if any variant cannot be served."""
    from .inspect_cmd import print_portfolio

    print_portfolio(portfolio, device_profiles.load_profile(profile), verify)


def bench(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    profile: str = typer.Option("host", help="A device profile name (see `edgeshift profiles`) or a .toml path."),
    variant: Optional[list[str]] = typer.Option(None, help="Only these variants (repeatable)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results and fingerprint as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write one CSV row per variant."),
    save: bool = typer.Option(
        False,
        "--save",
        help="Keep the results beside the portfolio (<stem>.bench.json): the runtime then orders "
        "its ladder by them on this device, under this profile.",
    ),
) -> None:
    """Measure every variant on this device, against each other in one interleaved run: inflate, session creation,
    latency percentiles, throughput, RSS, and the ladder these figures give."""
    from edgeshift.device_profiles.profile import execution_summary

    from .bench import BENCH_HEADER, bench_file, bench_rows, cascade_lines, ladder_lines, write_csv, write_json
    from .ladder import bench_path_for

    prof = device_profiles.load_profile(profile)
    doc, results = bench_file(portfolio, prof, variant)
    fp = doc["fingerprint"]
    typer.echo(
        f"{portfolio} on {fp['machine']} {fp['cpu']} x{fp['cores']}, onnxruntime {fp['onnxruntime']}, "
        f"profile {prof.name} (batch {prof.serving.batch_size}, {execution_summary(doc['execution'])}, "
        f"{prof.benchmark.rounds} interleaved rounds)"
    )
    echo_table(bench_rows(results, doc["ladder"]), BENCH_HEADER)
    for line in [*ladder_lines(doc), *cascade_lines(doc)]:
        typer.echo(line)
    cached = [r.engine_cached for r in results if r.engine_cached is not None]
    if cached:
        typer.echo(
            f"compiled engines: {cached.count(True)} loaded from the cache, {cached.count(False)} built now and "
            f"cached, so later switches load them"
        )
    if save:
        write_json(bench_path_for(portfolio), doc)
        typer.echo(f"wrote {bench_path_for(portfolio)}")
    if json_out:
        write_json(json_out, doc)
        typer.echo(f"wrote {json_out}")
    if csv_out:
        write_csv(csv_out, results)
        typer.echo(f"wrote {csv_out}")


def run(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    images: Path = typer.Option(..., "--images", help="A folder of images (jpg/png need Pillow; .npy do not)."),
    profile: str = typer.Option("host", help="A device profile name or a .toml path."),
    variant: Optional[str] = typer.Option(None, help="The variant to use (default: the middle step of the ladder)."),
    top: int = typer.Option(1, min=1, help="How many classes to print per image."),
    batch: int = typer.Option(16, min=1, help="Images per inference call."),
    cascade: bool = typer.Option(
        False,
        "--cascade",
        help="Run the portfolio's calibrated cascade (`export --cascade`): each image leaves at the first step sure "
        "enough of it.",
    ),
    thresholds: Optional[str] = typer.Option(
        None,
        help="Cascade: one top-1 probability in [0, 1] per step but the last, comma-separated (default: the "
        "calibrated ones); 1 sends every image on, 0 stops every image at the first step.",
    ),
) -> None:
    """Classify a folder of images with one variant of a portfolio, or with its cascade."""
    from .cascade import parse_thresholds
    from .engine import Runtime
    from .run_images import classify_folder

    prof = device_profiles.load_profile(profile)
    if thresholds is not None and not cascade:
        raise EdgeshiftError("--thresholds are the cascade's: add --cascade")
    chosen = parse_thresholds(thresholds) if thresholds is not None else None
    with Runtime(portfolio, profile=prof, start=variant, cascade=cascade, thresholds=chosen) as rt:
        n = 0
        say = lambda line: typer.echo(printable(line), err=True)  # noqa: E731
        for path, best in classify_folder(rt, images, batch=batch, top=top, limits=prof.limits, say=say):
            typer.echo(printable(path) + "\t" + "\t".join(printable(f"{label} {p:.3f}") for label, p in best))
            n += 1
        s = rt.stats()
        served = "the cascade" if cascade else rt.active
        typer.echo(f"{n} images with {served}: p50 {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms per batch")
        if cascade:
            c = s["cascade"]
            typer.echo(
                f"cascade thresholds {', '.join(f'{t:g}' for t in c['thresholds'])}; answered by "
                + ", ".join(f"{step} {count}" for step, count in c["exits"].items())
            )


def simulate_cmd(
    portfolio: Path = typer.Argument(..., help="A portfolio file (.zip)."),
    trace: Path = typer.Option(..., "--trace", help="CSV time_s,rps[,cpu_share][,available_mb] or JSON rows."),
    policy: str = typer.Option("qps-trend", help=f"The switch policy: {policies.POLICIES.choices_help()}."),
    profile: str = typer.Option("host", help="A device profile name or a .toml path."),
    step: float = typer.Option(1.0, min=0.01, help="Seconds per simulated decision window."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write switches and totals as JSON."),
) -> None:
    """Replay a load trace against a policy; print every switch with its reason and measured cost."""
    policies.POLICIES.entry(policy)  # an unknown name fails here, naming the known ones
    import json

    from edgeshift.core.atomic import write_text_atomic

    from .simulate import result_document, simulate_file

    res, lines = simulate_file(portfolio, trace, policy, device_profiles.load_profile(profile), step)
    for line in lines:
        typer.echo(printable(line))
    if json_out:
        write_text_atomic(json_out, json.dumps(result_document(res), indent=2))


def profiles_cmd() -> None:
    """List the built-in device profiles."""
    rows = []
    for name in device_profiles.names():
        p = device_profiles.load_profile(name)
        rows.append(
            [
                name,
                ", ".join(p.execution.providers),
                str(p.execution.intra_op_threads),
                f"{p.serving.latency_target_ms:g}",
                str(p.serving.memory_budget_mb),
            ]
        )
    echo_table(rows, ["profile", "providers (preferred first)", "threads", "target ms", "memory MB"])


def register(app: typer.Typer) -> None:
    """Add the device commands to ``app``."""
    for name, fn in (
        ("inspect", inspect),
        ("bench", bench),
        ("run", run),
        ("simulate", simulate_cmd),
        ("profiles", profiles_cmd),
    ):
        app.command(name)(handle_errors(fn))
