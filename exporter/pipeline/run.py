"""``edgeshift pipeline CONFIG.toml``: variants -> portfolio -> bench -> simulate -> report -> summary, resumable.

Every step writes its output atomically and is skipped when that output exists, so a killed run resumes where it
stopped; ``pipeline.json`` in the output folder holds the configuration and its hash, and a folder made with
another configuration is refused.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from edgeshift import device_profiles
from edgeshift.core.atomic import write_text_atomic
from edgeshift.core.config import toml_value
from edgeshift.core.errors import EdgeshiftError, InputFileError, require_file
from edgeshift.core.tables import echo_table, markdown_table
from edgeshift.device_profiles import DeviceProfile
from edgeshift.pruner.checkpoint import load_checkpoint, read_checkpoint
from edgeshift.pruner.layers.layerprune import removable_candidates
from edgeshift.pruner.learned_masks import GateConfig, LearnedMasks
from edgeshift.pruner.models.zoo import input_shape
from edgeshift.runtime import policies
from edgeshift.runtime.bench import BENCH_HEADER, bench_file, bench_rows, cascade_lines, ladder_lines, write_json
from edgeshift.runtime.ladder import bench_path_for
from edgeshift.runtime.portfolio import Portfolio
from edgeshift.runtime.simulate import result_document, simulate_file

from ..export_cmd import export_portfolio
from ..report import write_report
from .config import PipelineConfig, parse_config
from .methods import build_variants, model_spec
from .targets import candidate_lines, choice_lines, choose, int8_cover_lines

BUILTIN_TRACE = "time_s,rps,cpu_share\n0,20,1\n10,400,1\n20,1500,0.6\n30,400,1\n40,20,1\n"


def validate(cfg: PipelineConfig) -> DeviceProfile:
    """Every name and path the run will need, checked before anything is written or trained (values, ranges and
    each method's settings were checked by the loader); returns the device profile, resolved once for the run."""
    # the model is built (and its weights loaded) once here: an unknown source, a factory that does not import or
    # weights of another model fail before anything is written
    model_spec(cfg).build()
    profile = device_profiles.load_profile(cfg.deploy.profile)
    policies.get(cfg.deploy.policy)
    if cfg.data.path != "generated" and not Path(cfg.data.path).exists():
        raise InputFileError(f"data folder not found: {cfg.data.path} (pass a folder or 'generated')")
    if cfg.deploy.trace:
        require_file(cfg.deploy.trace, "load trace")
    if cfg.variants.dense:
        require_file(cfg.variants.dense, "dense checkpoint ([variants] dense)")
        name = read_checkpoint(cfg.variants.dense)["arch"]["name"]
        if name != cfg.model.arch:
            raise EdgeshiftError(
                f"[variants] dense is a {name} checkpoint but [model] arch is {cfg.model.arch!r}; make them the same "
                "model"
            )
    if cfg.variants.targets:
        validate_targets(cfg)
    return profile


def validate_targets(cfg: PipelineConfig) -> None:
    """The model the targets start from can make every family of candidates asked for."""
    v = cfg.variants
    # [variants] dense was checked against [model] arch by validate
    model = load_checkpoint(v.dense)[0] if v.dense else model_spec(cfg).build()
    families = set(v.candidates)
    try:
        if families & {"slim", "layerprune+slim"}:
            example = torch.randn(input_shape(model, 2), generator=torch.Generator().manual_seed(0))
            LearnedMasks(model, example, GateConfig(target=0.5)).detach_hooks()
        if families & {"layerprune", "layerprune+slim"}:
            removable_candidates(model)
    except EdgeshiftError as exc:
        raise EdgeshiftError(f"[variants] candidates = {list(v.candidates)}: {exc}") from None


def _step(n: int, total: int, text: str) -> None:
    print(f"== {n}/{total} {text}", flush=True)


def prepare_output(cfg: PipelineConfig) -> Path:
    """Create the output folder, or check that it belongs to this configuration."""
    out = Path(cfg.output.dir)
    meta = out / "pipeline.json"
    doc = {"config_hash": cfg.hash(), "config": asdict(cfg)}
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old.get("config_hash") != doc["config_hash"]:
            raise EdgeshiftError(
                f"{out} holds a pipeline run with another configuration; use another output.dir "
                "or the same configuration (to resume)"
            )
    elif out.exists() and any(out.iterdir()):
        raise EdgeshiftError(f"{out} exists and is not an edgeshift pipeline folder; choose another output.dir")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta, json.dumps(doc, indent=2))
    return out


def summary_rows(portfolio: Path, bench: dict, sim: dict) -> list[list[str]]:
    """variant, params, deflated KB, top-1 (ONNX Runtime, at export), p50/p95 on this device, time active."""
    measured = {v["name"]: v for v in bench["variants"]}
    steps = {name: i + 1 for i, name in enumerate(bench.get("ladder") or [])}
    active = sim.get("seconds_per_variant", {})
    rows = []
    with Portfolio.open(portfolio) as pf:
        for name in pf.names:
            info, b = pf.info(name), measured.get(name, {})
            rows.append(
                [
                    name,
                    f"{info.params:,}",
                    f"{info.deflated_bytes / 1024:.0f}",
                    "-" if info.top1 is None else f"{100 * info.top1:.2f}%",
                    f"{b.get('p50_ms', float('nan')):.3f}",
                    f"{b.get('p95_ms', float('nan')):.3f}",
                    str(steps.get(name, "-")),
                    f"{active.get(name, 0):.0f}",
                ]
            )
    return rows


def write_targets(portfolio: Path, bench: dict, targets: tuple[float, ...], path: Path) -> list[str]:
    """Per target, the variant that serves it (``targets.choose``) from this bench, written to ``path``."""
    with Portfolio.open(portfolio) as pf:
        top1 = {name: pf.info(name).top1 for name in pf.names}
    choices = choose(targets, bench, top1)
    dense_p50 = next(v["p50_ms"] for v in bench["variants"] if v["name"] == "dense")
    lines = choice_lines(choices, dense_p50)
    write_text_atomic(
        path, json.dumps({"dense_p50_ms": dense_p50, "targets": [asdict(c) for c in choices], "lines": lines}, indent=2)
    )
    return lines


SUMMARY_HEADER = ["variant", "params", "KB deflated", "top-1", "p50 ms", "p95 ms", "ladder", "simulated s active"]


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or resume) every step; returns the output folder."""
    profile = validate(cfg)  # fail on a bad name before hours of training
    t0 = time.perf_counter()
    out = prepare_output(cfg)
    total = 6
    made = (
        f"candidates for targets {', '.join(f'{t:g}' for t in cfg.variants.targets)} of the dense p50"
        if cfg.variants.targets
        else f"method{'s' if len(cfg.methods) > 1 else ''} {', '.join(c.name for c in cfg.methods)}"
    )
    _step(1, total, f"variants: {cfg.model.arch} on {cfg.data.path}, {made} -> {out / 'variants'}")
    sources = build_variants(cfg, out, profile)
    portfolio = out / "portfolio.zip"
    _step(2, total, f"exact structured pruning, ONNX export, profiling -> {portfolio}")
    if not portfolio.exists():
        d = cfg.deploy
        export_portfolio(
            sources,
            portfolio,
            data=cfg.data.path,
            test_samples=d.export_test_samples,
            profile=profile,
            latency_iterations=d.latency_iterations,
            align=d.align,
            int8=d.int8,
            calibration_samples=d.calibration_samples,
            calibration_method=d.calibration_method,
            cascade=d.cascade,
            cascade_loss=d.cascade_loss,
            cascade_samples=d.cascade_samples,
        )
    bench_path = bench_path_for(portfolio)  # beside the portfolio: the runtime orders its ladder by it
    _step(3, total, f"benchmark on this machine (profile {profile.name}) -> {bench_path}")
    if not bench_path.exists():
        doc, results = bench_file(portfolio, profile)
        echo_table(bench_rows(results, doc["ladder"]), BENCH_HEADER)
        print("\n".join([*ladder_lines(doc), *cascade_lines(doc)]))
        write_json(bench_path, doc)
    trace = Path(cfg.deploy.trace) if cfg.deploy.trace else out / "trace.csv"
    if not cfg.deploy.trace and not trace.exists():
        write_text_atomic(trace, BUILTIN_TRACE)
    sim_path = out / "simulate.json"
    _step(4, total, f"load trace {trace} replayed against the {cfg.deploy.policy} policy -> {sim_path}")
    if not sim_path.exists():
        res, lines = simulate_file(portfolio, trace, cfg.deploy.policy, profile)
        print("\n".join(lines))
        write_text_atomic(sim_path, json.dumps(result_document(res), indent=2))
    if cfg.variants.targets:
        targets_path = out / "targets.json"
        print(
            f"== targets {', '.join(f'{t:g}' for t in cfg.variants.targets)} of the dense p50 -> {targets_path}",
            flush=True,
        )
        lines = write_targets(portfolio, json.loads(bench_path.read_text()), cfg.variants.targets, targets_path)
        print("\n".join(lines))
    _step(5, total, f"report -> {out / 'portfolio.md'}, {out / 'portfolio.png'}")
    write_report(portfolio, out)
    _step(6, total, "summary")
    rows = summary_rows(portfolio, json.loads(bench_path.read_text()), json.loads(sim_path.read_text()))
    echo_table(rows, SUMMARY_HEADER)
    sim = json.loads(sim_path.read_text())
    summary = markdown_table(rows, SUMMARY_HEADER)
    if cfg.variants.targets:
        lines = json.loads((out / "targets.json").read_text())["lines"]
        print("\n".join(lines))
        summary += "\n" + "".join(f"- {line}\n" for line in lines)
        summary += "\nCandidates (each trained on the same budget; top-1 on the run's test subset):\n\n" + "".join(
            f"- {line}\n" for line in candidate_lines(out / "variants")
        )
        ladder = json.loads((out / "variants" / "removal.json").read_text())
        summary += "".join(
            f"- {line}\n" for line in int8_cover_lines(cfg.variants.targets, ladder, cfg.variants.int8_loss_ok)
        )
    write_text_atomic(out / "summary.md", summary)
    print(
        f"{len(rows)} variants in {portfolio.stat().st_size / 1024:.0f} KB; {len(sim.get('switches', []))} "
        f"switches in the simulated trace; {time.perf_counter() - t0:.0f} s this run"
    )
    print(f"everything is in {out}")
    sys.stdout.flush()
    return out


def method_document(name: str, assignments: list[str]) -> dict[str, Any]:
    """One ``[[methods]]`` table from ``--set KEY=VALUE`` assignments, each refused in one line if malformed."""
    table: dict[str, Any] = {"name": name}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise EdgeshiftError(f"--set takes KEY=VALUE (e.g. remove=[2,3] or criterion=taylor), got {item!r}")
        table[key.strip()] = toml_value(text.strip())
    return table


def fraction_list(text: str, option: str) -> list[float]:
    """``0.75,0.5,0.25`` as numbers; anything else refused in one line naming ``option``."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EdgeshiftError(f"{option} takes numbers separated by commas, e.g. 0.75,0.5,0.25; got {text!r}") from None


def run_method(document: dict[str, Any], source: str = "edgeshift method") -> list[Path]:
    """Step 1 of the pipeline alone: one method's variants (checkpoints) from a configuration document with one
    ``[[methods]]`` table, resumable in its output folder; returns them for ``edgeshift export``."""
    dense = document.get("variants", {}).get("dense")
    if dense and "arch" not in document.get("model", {}):  # the model is the dense checkpoint's
        require_file(dense, "dense checkpoint (--dense)")
        document.setdefault("model", {})["arch"] = read_checkpoint(dense)["arch"]["name"]
    cfg = parse_config(document, source)
    profile = validate(cfg)
    out = prepare_output(cfg)
    _step(1, 1, f"variants: {cfg.model.arch} on {cfg.data.path}, method {cfg.methods[0].name} -> {out / 'variants'}")
    return build_variants(cfg, out, profile)
