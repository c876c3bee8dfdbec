"""Latency targets on CIFAR-10: every method's variants, and their INT8 forms, in one timed run.

Takes a finished `edgeshift pipeline` run with `[variants] targets` (its dense model and candidates: layer removal
`lp<k>`, learned widths `slim<s>`, both `lp<k>-slim<s>`), adds Torch-Pruning's uniform L1 width pruning of the same
dense model at `--l1` ratios trained on the same budget (the run's `finetune_epochs`, `lr`, batch, training
split and `distill`), then measures every model and its INT8 form (64 calibration images; with the profile's
`format = "auto"` both qoperator/uint8 and qdq/int8 are timed and the faster kept, as the pipeline does)
through ONNX Runtime: top-1 on the full test split, and p50 under the profile with every model timed against all
the others in one interleaved run. Per target and method: the most accurate variant whose p50 meets it. Writes
`compare.json`, `compare.md`, `compare.png` and each model's ONNX (for `benchmarks/op_breakdown.py`) into
`RUN/compare`; the L1 and IMP checkpoints are kept there and every model's top-1 is cached by the hash of its ONNX
graph (`accuracy.json`), so a rerun skips their training and evaluation.

IMP levels exactly pruned (the DNNShifter method, `--imp-levels K`): from the trained dense model, level k keeps
half of level k-1's conv and linear weights by global magnitude and is fine-tuned on the same budget with its mask
(and the same distillation), i.e. IMP with fine-tuning rather than rewinding, 2^k x compression; then
`prune_zero_channels` removes every channel the sparsity emptied, exactly (deviation printed), and the pruned model
joins the comparison as `imp<2^k>x`. `--extra NAME=CKPT` times models trained on another budget in the same run;
they are listed, never counted in a method's best.

    python benchmarks/targets_cifar.py --run /tmp/edgeshift-bench/targets-r20 [--l1 0.3 0.5 0.6 0.7] \
        [--imp-levels 4] [--extra lp7-15ep=/tmp/lp7.pt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from _common import width_pruned

from edgeshift.pruner.models.record import record_of

METHODS = ("uniform L1", "IMP", "layer removal", "learned masks", "removal + masks")
OTHER_BUDGET = "other budget"


def method_of(name: str, extra: frozenset[str] = frozenset()) -> str:
    base = name.removesuffix("-int8")
    if base == "dense":
        return "dense + INT8" if name.endswith("-int8") else "dense"
    if base in extra:
        kind = OTHER_BUDGET
    elif base.startswith("l1-"):
        kind = "uniform L1"
    elif re.fullmatch(r"imp\d+x", base):
        kind = "IMP"
    elif re.fullmatch(r"lp\d+", base):
        kind = "layer removal"
    elif base.startswith("slim"):
        kind = "learned masks"
    else:
        kind = "removal + masks"
    return kind + (" + INT8" if name.endswith("-int8") else "")


def main() -> None:
    import numpy as np
    import torch

    from edgeshift.core.atomic import write_text_atomic
    from edgeshift.device_profiles import load_profile
    from edgeshift.exporter.onnx_export import INPUT_NAME, onnx_bytes
    from edgeshift.exporter.profile import TestData, onnx_accuracy, time_interleaved_models
    from edgeshift.exporter.quantize import Calibration, fastest_int8
    from edgeshift.pruner import sparse
    from edgeshift.pruner.checkpoint import load_checkpoint, save_checkpoint
    from edgeshift.pruner.data import model_splits
    from edgeshift.pruner.distill import DistillConfig, Teacher
    from edgeshift.pruner.models.zoo import input_shape
    from edgeshift.pruner.structured import prune_zero_channels
    from edgeshift.pruner.train import TrainConfig, train
    from edgeshift.runtime.session import create_session

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished pipeline run with [variants] targets")
    ap.add_argument("--l1", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7], help="uniform L1 pruning ratios")
    ap.add_argument("--imp-levels", type=int, default=0, help="IMP levels 1..K (2^k x), exactly pruned; 0: none")
    ap.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="NAME=CKPT",
        help="checkpoints trained on another budget, timed in the same run, not counted as a method",
    )
    args = ap.parse_args()
    bad = [e for e in args.extra if "=" not in e or not e.split("=", 1)[0]]
    if bad:
        ap.error(f"--extra takes NAME=CHECKPOINT, got {bad[0]!r}")
    extra = dict(e.split("=", 1) for e in args.extra)
    cfg = json.loads((args.run / "pipeline.json").read_text())["config"]
    v, data, tr = cfg["variants"], cfg["data"], cfg["train"]
    profile = load_profile(cfg["deploy"]["profile"])
    out = args.run / "compare"
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    (out / "imp").mkdir(exist_ok=True)
    dense, _ = load_checkpoint(args.run / "variants" / "dense.pt")
    train_ds, test_small = model_splits(
        data["path"],
        record_of(dense),
        train_samples=data["train_samples"] or None,
        test_samples=data["test_samples"] or None,
        seed=tr["seed"],
    )
    steps = max(1, round(v["finetune_epochs"] * len(train_ds) / tr["batch_size"]))
    distill = DistillConfig(weight=v.get("distill", 0.0))
    teacher = Teacher(dense, distill) if distill.enabled else None
    for r in args.l1:
        path = out / f"l1-{r:g}.pt"
        if not path.exists():
            print(f"uniform L1 {r:g}: {steps} fine-tuning steps", flush=True)
            model = width_pruned(dense, r)
            train(
                model,
                train_ds,
                test_small,
                TrainConfig(
                    iterations=steps,
                    batch_size=tr["batch_size"],
                    lr=v["lr"],
                    weight_decay=tr["weight_decay"],
                    seed=tr["seed"],
                ),
                label=f"l1-{r:g}",
                teacher=teacher,
            )
            save_checkpoint(model.eval(), path, meta={"uniform_l1": r, "distill": distill.weight})

    x1 = torch.randn(input_shape(dense, 1), generator=torch.Generator().manual_seed(0))
    train_cfg = TrainConfig(
        iterations=steps, batch_size=tr["batch_size"], lr=v["lr"], weight_decay=tr["weight_decay"], seed=tr["seed"]
    )
    model, mask = dense, sparse.full_mask(dense)
    for k in range(1, args.imp_levels + 1):
        c = 2**k
        sparse_path, path = out / "imp" / f"imp{c}x-sparse.pt", out / f"imp{c}x.pt"
        if sparse_path.exists():
            model, payload = load_checkpoint(sparse_path)
            mask = payload["masks"]
        else:
            keep = round(sum(m.numel() for m in mask.values()) / c)
            mask = sparse.get("magnitude").score(model, mask, keep, tr["seed"])
            if k == 1:  # a copy: the dense model itself is the teacher and must stay as trained
                model = load_checkpoint(args.run / "variants" / "dense.pt")[0]
            print(
                f"IMP level {k} ({c}x, {100 * sparse.density(mask):.2f}% of the weights): {steps} fine-tuning steps",
                flush=True,
            )
            train(model, train_ds, test_small, train_cfg, mask=mask, label=f"imp{c}x", teacher=teacher)
            save_checkpoint(model.eval(), sparse_path, masks=mask, meta={"imp_level": k, "distill": distill.weight})
        if not path.exists():
            example = torch.randn(8, *x1.shape[1:], generator=torch.Generator().manual_seed(1))
            pruned, report = prune_zero_channels(model.eval(), example)
            print(
                f"imp{c}x exactly pruned: {report.params_before:,} -> {report.params_after:,} parameters, "
                f"deviation {report.rel_diff:.1e} of the largest output",
                flush=True,
            )
            save_checkpoint(
                pruned, path, meta={"imp_level": k, "deviation": report.rel_diff, "params_sparse": report.params_before}
            )

    _, test = model_splits(data["path"], record_of(dense), seed=tr["seed"])  # the full test split
    x_test, y_test = test.normalised(), test.labels
    calibration = Calibration(train_ds.normalised(np.arange(64)), "minmax", train_ds.name)
    feed = {INPUT_NAME: x1.numpy()}
    paths = {p.stem: p for p in sorted((args.run / "variants").glob("*.pt"))}
    paths.update({p.stem: p for p in sorted(out.glob("l1-*.pt"))})
    paths.update({p.stem: p for p in sorted(out.glob("imp*x.pt"), key=lambda p: int(p.stem[3:-1]))})
    paths.update({name: Path(ckpt) for name, ckpt in extra.items()})
    cache_path = out / "accuracy.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    graphs, rows = {}, {}
    for name, path in paths.items():
        model = load_checkpoint(path)[0]
        fp32 = onnx_bytes(model, x1)
        graphs[name] = fp32
        # host: format "auto", both INT8 formats timed per model and the faster kept, as the portfolio does
        choice = fastest_int8(fp32, calibration, profile, feed, name=name)
        if choice.candidates_p50_ms:
            print(
                f"{name}-int8: "
                + ", ".join(f"{k} {t:.3f} ms" for k, t in choice.candidates_p50_ms.items())
                + f" -> {choice.scheme.label}"
            )
        graphs[f"{name}-int8"] = choice.data
        params = sum(p.numel() for p in model.parameters())
        for n in (name, f"{name}-int8"):
            (out / "onnx" / f"{n}.onnx").write_bytes(graphs[n])
            key = hashlib.sha256(graphs[n]).hexdigest()
            if key not in cache:
                cache[key] = onnx_accuracy(create_session(graphs[n], profile), TestData(x_test, y_test))[0]
                write_text_atomic(cache_path, json.dumps(cache))
            top1 = cache[key]
            rows[n] = {
                "name": n,
                "method": method_of(n, frozenset(extra)),
                "params": params,
                "top1": top1,
                "int8_format": choice.scheme.label if n.endswith("-int8") else None,
            }
            print(f"{n}: top-1 {100 * top1:.2f}%", flush=True)
    print(f"timing {len(graphs)} models against each other under profile {profile.name}", flush=True)
    stats = time_interleaved_models(graphs, feed, profile, batch=1)
    base = stats["dense"].p50_ms
    for n, s in stats.items():
        rows[n].update(p50_ms=s.p50_ms, p95_ms=s.p95_ms, ratio=s.p50_ms / base)

    targets = [float(t) for t in v["targets"]]
    families = ["dense + INT8"] + [m + f for m in METHODS for f in ("", " + INT8")]
    best: dict[str, dict[str, dict | None]] = {}
    for t in targets:
        best[f"{t:g}"] = {}
        for fam in families:
            within = [r for r in rows.values() if r["method"] == fam and r["ratio"] <= t]
            best[f"{t:g}"][fam] = max(within, key=lambda r: (r["top1"], -r["ratio"])) if within else None
    dense_top1 = rows["dense"]["top1"]
    lines = [
        f"dense: top-1 {100 * dense_top1:.2f}%, p50 {base:.3f} ms (profile {profile.name}, batch 1)",
        "",
        "| target | " + " | ".join(families) + " |",
        "|---|" + "---|" * len(families),
    ]
    for t in targets:
        cells = []
        for fam in families:
            r = best[f"{t:g}"][fam]
            cells.append("-" if r is None else f"{r['name']}: {100 * r['top1']:.2f}% ({r['ratio']:.2f}x)")
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| target | best edgeshift | top-1 - dense | best uniform L1 (any form) | edgeshift - L1 |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        ours = [r for fam, r in best[f"{t:g}"].items() if r and not fam.startswith("uniform")]
        theirs = [r for fam, r in best[f"{t:g}"].items() if r and fam.startswith("uniform")]
        a = max(ours, key=lambda r: r["top1"]) if ours else None
        b = max(theirs, key=lambda r: r["top1"]) if theirs else None
        lines.append(
            f"| {t:g} | "
            + (f"{a['name']} {100 * a['top1']:.2f}% ({a['ratio']:.2f}x)" if a else "none")
            + " | "
            + (f"{100 * (a['top1'] - dense_top1):+.2f}" if a else "-")
            + " | "
            + (f"{b['name']} {100 * b['top1']:.2f}% ({b['ratio']:.2f}x)" if b else "none")
            + " | "
            + (f"{100 * (a['top1'] - b['top1']):+.2f}" if a and b else "-")
            + " |"
        )
    lines += [
        "",
        "| variant | method | params | top-1 | p50 ms | p95 ms | p50 / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows.values(), key=lambda r: r["p50_ms"]):
        lines.append(
            f"| {r['name']} | {r['method']} | {r['params']:,} | {100 * r['top1']:.2f}% | {r['p50_ms']:.3f} | "
            f"{r['p95_ms']:.3f} | {r['ratio']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    write_text_atomic(out / "compare.md", text + "\n")
    write_text_atomic(
        out / "compare.json",
        json.dumps(
            {
                "profile": profile.name,
                "dense_p50_ms": base,
                "targets": targets,
                "variants": list(rows.values()),
                "best": best,
                "budget_steps": steps,
            },
            indent=2,
        ),
    )
    chart(rows, targets, dense_top1, out / "compare.png")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.png'}")


def chart(rows: dict, targets: list[float], dense_top1: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = dict(zip(METHODS, ("tab:gray", "tab:red", "tab:blue", "tab:orange", "tab:green")))
    for m in METHODS:
        for int8 in (False, True):
            pts = [r for r in rows.values() if r["method"] == m + (" + INT8" if int8 else "")]
            if pts:
                ax.scatter(
                    [r["ratio"] for r in pts],
                    [100 * r["top1"] for r in pts],
                    color=colours[m],
                    marker="^" if int8 else "o",
                    label=m + (" + INT8" if int8 else ""),
                    alpha=0.8,
                )
    other = [r for r in rows.values() if r["method"].startswith(OTHER_BUDGET)]
    if other:
        ax.scatter(
            [r["ratio"] for r in other],
            [100 * r["top1"] for r in other],
            color="purple",
            marker="x",
            label="longer budget (not in the table)",
        )
    ax.scatter([1.0], [100 * dense_top1], color="black", marker="*", s=120, label="dense")
    if "dense-int8" in rows:
        ax.scatter(
            [rows["dense-int8"]["ratio"]],
            [100 * rows["dense-int8"]["top1"]],
            color="black",
            marker="^",
            label="dense + INT8",
        )
    for t in targets:
        ax.axvline(t, color="lightgray", linestyle="--", linewidth=0.8)
    ax.axhline(100 * dense_top1 - 1, color="lightgray", linewidth=0.8)
    ax.set_xlabel("p50 / dense p50 (batch 1, one interleaved run)")
    ax.set_ylabel("top-1 on the full test split (%)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
