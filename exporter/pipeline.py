"""``edgeshift pipeline CONFIG.toml``: variants -> portfolio -> bench -> simulate -> report -> summary, resumable.

The configuration (one TOML file, strict: an unknown section or key is an error naming it)::

    [model]   arch = "resnet20"
    [data]    path = "generated"          # or an ImageFolder root / CIFAR-10 python folder
              train_samples = 5000        # optional stratified subsets
              test_samples = 1000
    [method]  name = "imp"                # imp | magnitude | random | synflow | pai | layerprune
              levels = 4                  # imp & one-shot: level k keeps (1 - prune_fraction)^k
              prune_fraction = 0.5
              rewind_step = 5
              sparsities = [0.5, 0.8, 0.9]  # pai: one variant per sparsity
              pai_mode = "reconvene"
              criterion = "imprint"       # layerprune: one variant per entry of `remove`
              remove = [1, 2, 3]
              finetune_epochs = 1
    [train]   epochs = 3, batch_size = 64, lr = 0.05, warmup = 20, weight_decay = 5e-4, seed = 0
    [deploy]  profile = "host", policy = "qps-trend", trace = "" (built in: load rises and falls),
              export_test_samples = 500, latency_iterations = 50, align = 1 (8: widths multiples of 8)
    [output]  dir = "out/pipeline"

Every step writes its output atomically and is skipped when that output exists, so a killed run resumes where it
stopped; ``pipeline.json`` in the output folder holds the configuration and its hash, and a folder made with
another configuration is refused.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgeshift.core.atomic import write_text_atomic
from edgeshift.core.errors import EdgeshiftError, InputFileError, require_file

METHODS = ("imp", "magnitude", "random", "synflow", "pai", "layerprune")
BUILTIN_TRACE = "time_s,rps,cpu_share\n0,20,1\n10,400,1\n20,1500,0.6\n30,400,1\n40,20,1\n"


@dataclass(frozen=True)
class ModelSection:
    arch: str = "resnet20"  # zoo architecture


@dataclass(frozen=True)
class DataSection:
    path: str = "generated"  # 'generated', an ImageFolder root or a CIFAR-10 python folder
    train_samples: int = 0  # 0: the whole training split
    test_samples: int = 0  # 0: the whole test split (training-time evaluation)


@dataclass(frozen=True)
class MethodSection:
    name: str = "imp"  # imp | magnitude | random | synflow | pai | layerprune
    levels: int = 4  # imp and one-shot methods: levels after the dense one
    prune_fraction: float = 0.5  # of the remaining weights per level
    rewind_step: int = 5  # imp: the step survivors rewind to
    sparsities: tuple = (0.5, 0.8, 0.9)  # pai: one variant per sparsity
    pai_mode: str = "reconvene"  # pai: reconvene | all-layers | inverted | unstructured
    scorer: str = "magnitude"  # pai: the unstructured scorer
    criterion: str = "imprint"  # layerprune: the layer criterion
    remove: tuple = (1, 2, 3)  # layerprune: one variant per count of removed candidates
    finetune_epochs: int = 1  # layerprune: fine-tuning epochs per variant


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 3  # per level / per variant
    batch_size: int = 64
    lr: float = 0.05
    warmup: int = 20  # linear warm-up steps
    weight_decay: float = 5e-4
    seed: int = 0


@dataclass(frozen=True)
class DeploySection:
    profile: str = "host"  # device profile for bench and simulate (name or TOML path)
    policy: str = "qps-trend"  # switch policy replayed by simulate
    trace: str = ""  # a load trace (CSV/JSON); empty: a built-in trace that rises and falls
    export_test_samples: int = 500  # test images for the portfolio's ONNX Runtime accuracy
    latency_iterations: int = 50  # timed calls per variant at export
    align: int = 1  # round pruned widths up to multiples of this with zero channels (exact; 8 helps 2+ threads)


@dataclass(frozen=True)
class OutputSection:
    dir: str = "out/pipeline"  # everything goes here


@dataclass(frozen=True)
class PipelineConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: MethodSection = field(default_factory=MethodSection)
    train: TrainSection = field(default_factory=TrainSection)
    deploy: DeploySection = field(default_factory=DeploySection)
    output: OutputSection = field(default_factory=OutputSection)

    def hash(self) -> str:
        doc = asdict(self)
        doc.pop("output")  # where it goes does not change what it is
        if doc["deploy"]["align"] == 1:
            del doc["deploy"]["align"]  # at its default a later-added key keeps earlier run folders resumable
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _section(cls, table: dict, name: str, source: str):
    if not isinstance(table, dict):
        raise InputFileError(f"{source}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise InputFileError(f"{source}: unknown key {name}.{key}; known: {', '.join(sorted(known))}")
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list):
                raise InputFileError(f"{source}: {name}.{key} must be a list, e.g. {list(default)}")
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(default):
            raise InputFileError(f"{source}: {name}.{key} must be {type(default).__name__}, got {value!r}")
        values[key] = value
    return cls(**values)


def parse_config(data: dict, source: str = "<config>") -> PipelineConfig:
    """A validated PipelineConfig from a parsed TOML document."""
    sections = {f.name: f.default_factory for f in fields(PipelineConfig)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise InputFileError(f"{source}: unknown section [{unknown[0]}]; known: {', '.join(sections)}")
    cfg = PipelineConfig(**{name: _section(type(factory()), data.get(name, {}), name, source)
                            for name, factory in sections.items()})
    if cfg.method.name not in METHODS:
        raise InputFileError(f"{source}: unknown method {cfg.method.name!r}; known: {', '.join(METHODS)}")
    return cfg


def load_config(path: str | Path, *, arch: str | None = None, data: str | None = None,
                out: str | None = None) -> PipelineConfig:
    """Read a pipeline TOML file; ``arch``/``data``/``out`` override the file (``make demo DATA=... ARCH=...``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    require_file(path, "pipeline configuration")
    try:
        doc = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InputFileError(f"{path} is not valid TOML: {exc}") from None
    for value, section, key in ((arch, "model", "arch"), (data, "data", "path"), (out, "output", "dir")):
        if value:
            doc.setdefault(section, {})[key] = value
    return parse_config(doc, str(path))


def validate(cfg: PipelineConfig) -> None:
    """Every name and path the run will need, checked before anything is written or trained."""
    from edgeshift import device_profiles
    from edgeshift.pruner import sparse
    from edgeshift.pruner.layers import criteria
    from edgeshift.pruner.models import zoo
    from edgeshift.pruner.pai import get_mode
    from edgeshift.runtime import policies

    zoo.entry(cfg.model.arch)
    device_profiles.load_profile(cfg.deploy.profile)
    policies.get(cfg.deploy.policy)
    if cfg.data.path != "generated" and not Path(cfg.data.path).exists():
        raise InputFileError(f"data folder not found: {cfg.data.path} (pass a folder or 'generated')")
    if cfg.deploy.trace:
        require_file(cfg.deploy.trace, "load trace")
    if cfg.deploy.align < 1:
        raise EdgeshiftError(f"deploy.align must be >= 1 (1 = keep the widths pruning leaves), got {cfg.deploy.align}")
    if cfg.method.name == "pai":
        get_mode(cfg.method.pai_mode)
        sparse.get(cfg.method.scorer)
        bad = [p for p in cfg.method.sparsities if not 0 < float(p) < 1]
        if bad or not cfg.method.sparsities:
            raise EdgeshiftError(f"method.sparsities must be values in (0, 1), got {list(cfg.method.sparsities)}")
    if cfg.method.name == "layerprune":
        criteria.get(cfg.method.criterion)
        if not cfg.method.remove or any(int(n) < 1 for n in cfg.method.remove):
            raise EdgeshiftError(f"method.remove must be counts >= 1, got {list(cfg.method.remove)}")


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
            raise EdgeshiftError(f"{out} holds a pipeline run with another configuration; use another output.dir "
                                 "or the same configuration (to resume)")
    elif out.exists() and any(out.iterdir()):
        raise EdgeshiftError(f"{out} exists and is not an edgeshift pipeline folder; choose another output.dir")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta, json.dumps(doc, indent=2))
    return out


def _train_config(cfg: PipelineConfig, epochs: int | None = None):
    from edgeshift.pruner.train import TrainConfig

    t = cfg.train
    return TrainConfig(epochs=epochs if epochs is not None else t.epochs, batch_size=t.batch_size, lr=t.lr,
                       weight_decay=t.weight_decay, warmup_steps=t.warmup, seed=t.seed)


def _run_config(cfg: PipelineConfig, method: str):
    from edgeshift.pruner.imp import RunConfig

    return RunConfig(arch=cfg.model.arch, data=cfg.data.path, method=method,
                     prune_fraction=cfg.method.prune_fraction, rewind_step=cfg.method.rewind_step,
                     train_samples=cfg.data.train_samples or None, test_samples=cfg.data.test_samples or None,
                     seed=cfg.train.seed)


def _dense(cfg: PipelineConfig, variants: Path) -> Path:
    """The dense trained model (level 0 of a sparse run with no levels), shared by pai and layerprune, copied to
    ``variants/dense.pt`` so the portfolio calls it ``dense``."""
    import shutil

    from edgeshift.pruner.imp import run_sparse
    from edgeshift.core.atomic import atomic_path

    path = variants / "dense.pt"
    if not path.exists():
        run_sparse(variants / "dense-run", _run_config(cfg, "imp"), _train_config(cfg), 0)
        with atomic_path(path) as tmp:
            shutil.copyfile(variants / "dense-run" / "level_0" / "checkpoint.pt", tmp)
    return path


def build_variants(cfg: PipelineConfig, out: Path) -> list[Path]:
    """Step 1: the method's checkpoints (resumable); returns the sources for the exporter."""
    from edgeshift.pruner.checkpoint import save_checkpoint

    variants = out / "variants"
    variants.mkdir(exist_ok=True)
    m = cfg.method
    if m.name in ("imp", "magnitude", "random", "synflow"):
        from edgeshift.pruner.imp import run_sparse

        run_sparse(variants / "run", _run_config(cfg, m.name), _train_config(cfg), m.levels)
        return [variants / "run"]
    dense = _dense(cfg, variants)
    sources = [dense]
    if m.name == "pai":
        from edgeshift.pruner.imp import _load_data
        from edgeshift.pruner.models import zoo
        from edgeshift.pruner.pai import PaiConfig, pai
        from edgeshift.pruner.train import train

        run = _run_config(cfg, "pai")
        train_ds, test_ds = _load_data(run, None, zoo.entry(cfg.model.arch).input_size)
        for p in m.sparsities:
            path = variants / f"pai-{float(p):g}.pt"
            if not path.exists():
                model, mask, report = pai(PaiConfig(cfg.model.arch, float(p), scorer=m.scorer, mode=m.pai_mode,
                                                    num_classes=train_ds.num_classes, seed=cfg.train.seed,
                                                    profile=False))
                model.edgeshift_arch["normalisation"] = {"mean": list(train_ds.mean), "std": list(train_ds.std)}
                res = train(model, train_ds, test_ds, _train_config(cfg), mask=mask, label=f"pai {p:g}")
                save_checkpoint(model, path, masks=mask, meta={"test_accuracy": res.test_accuracy,
                                                               "pai": {k: v for k, v in report.to_dict().items()
                                                                       if k != "layers"}})
            sources.append(path)
        return sources
    from edgeshift.pruner.layers.layerprune import LayerPruneConfig, layerprune_checkpoint

    for n in m.remove:
        path = variants / f"layerprune-{int(n)}.pt"
        if not path.exists():
            layerprune_checkpoint(dense, path, LayerPruneConfig(criterion=m.criterion, remove=int(n),
                                                                profile=cfg.deploy.profile, seed=cfg.train.seed),
                                  data=cfg.data.path, finetune=_train_config(cfg, m.finetune_epochs) if
                                  m.finetune_epochs else None, train_samples=cfg.data.train_samples or None,
                                  test_samples=cfg.data.test_samples or None)
        sources.append(path)
    return sources


def summary_rows(portfolio: Path, bench: dict, sim: dict) -> list[list[str]]:
    """variant, params, deflated KB, top-1 (ONNX Runtime, at export), p50/p95 on this device, time active."""
    from edgeshift.runtime.portfolio import Portfolio

    measured = {v["name"]: v for v in bench["variants"]}
    active = sim.get("seconds_per_variant", {})
    rows = []
    with Portfolio.open(portfolio) as pf:
        for name in pf.names:
            info, b = pf.info(name), measured.get(name, {})
            rows.append([name, f"{info.params:,}", f"{info.deflated_bytes / 1024:.0f}",
                         "-" if info.top1 is None else f"{100 * info.top1:.2f}%",
                         f"{b.get('p50_ms', float('nan')):.3f}", f"{b.get('p95_ms', float('nan')):.3f}",
                         f"{active.get(name, 0):.0f}"])
    return rows


SUMMARY_HEADER = ["variant", "params", "KB deflated", "top-1", "p50 ms", "p95 ms", "simulated s active"]


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or resume) every step; returns the output folder."""
    from edgeshift import device_profiles
    from edgeshift.runtime.bench import BENCH_HEADER, bench_file, bench_rows, write_json
    from edgeshift.core.tables import echo_table
    from edgeshift.runtime.simulate import result_document, simulate_file

    from .export_cmd import export_portfolio
    from .report import write_report

    validate(cfg)  # fail on a bad name before hours of training
    profile = device_profiles.load_profile(cfg.deploy.profile)
    t0 = time.perf_counter()
    out = prepare_output(cfg)
    total = 6
    _step(1, total, f"variants: {cfg.model.arch} on {cfg.data.path}, method {cfg.method.name} -> {out / 'variants'}")
    sources = build_variants(cfg, out)
    portfolio = out / "portfolio.zip"
    _step(2, total, f"exact structured pruning, ONNX export, profiling -> {portfolio}")
    if not portfolio.exists():
        export_portfolio(sources, portfolio, data=cfg.data.path, test_samples=cfg.deploy.export_test_samples,
                         latency_iterations=cfg.deploy.latency_iterations, align=cfg.deploy.align)
    bench_path = out / "bench.json"
    _step(3, total, f"benchmark on this machine (profile {profile.name}) -> {bench_path}")
    if not bench_path.exists():
        doc, results = bench_file(portfolio, profile)
        echo_table(bench_rows(results), BENCH_HEADER)
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
    _step(5, total, f"report -> {out / 'portfolio.md'}, {out / 'portfolio.png'}")
    write_report(portfolio, out)
    _step(6, total, "summary")
    rows = summary_rows(portfolio, json.loads(bench_path.read_text()), json.loads(sim_path.read_text()))
    echo_table(rows, SUMMARY_HEADER)
    sim = json.loads(sim_path.read_text())
    lines = [f"| {' | '.join(SUMMARY_HEADER)} |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
    print(f"{len(rows)} variants in {portfolio.stat().st_size / 1024:.0f} KB; {len(sim.get('switches', []))} "
          f"switches in the simulated trace; {time.perf_counter() - t0:.0f} s this run")
    print(f"everything is in {out}")
    sys.stdout.flush()
    return out
