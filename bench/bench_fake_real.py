"""Fake -> real without a real label (issue 13): the models of bench_dropout_drop.py (trained on
generated images only), then made to work on real photos with unlabelled real images:
`train --adapt-bn` and `train --pseudo-label`; writes fake_real.md and fake_real.json in --out.

    .venv/bin/python bench/bench_fake_real.py --out bench/out/drop --target real-sub/train \\
        --val fake-split/val --select fake-select --test real-split/val --seeds 0,1,2

--out is bench_dropout_drop.py's (its baselines and dropout models are reused, never retrained).
Rows, each over --seeds:
- generated images only: the baseline (no real image at all);
- + dropout: the method and count whose models score best on --select (held-out generated
  images that no scorer used), beside random removal of the same count (the control);
- + adapt-bn / + pseudo-label / both (and with --combined, on the dropout row's models):
  `train --resume MODEL` with the unlabelled --target images
  (a split of the CIFAR-10 train set, never the test images). Pseudo-labels are class-balanced
  (--keep-fraction, the most confident 20% of each predicted class) unless --keep-fraction 0
  (then --threshold); the values are fixed here, not tuned: no real label is used for any choice.
--test (real photos) is only reported. Before the drop bench has finished (no drop.json), only
the adaptation rows are made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

from bench_dropout_drop import FAKECIFAR, evaluate, run, top1

from common import stamp


def adapted_done(model: Path, *, bn: bool, pseudo: bool, rounds: int) -> bool:
    """Whether `model` already holds the finished adaptation (a rerun after a kill)."""
    if not model.exists():
        return False
    from fakecifar.checkpoint import load_checkpoint

    adapt = (load_checkpoint(model)[1].get("train") or {}).get("adapt") or {}
    return bool(
        adapt.get("finalized")
        and (not bn or (adapt.get("bn") or {}).get("adapted"))
        and (not pseudo or int(adapt.get("round", 0)) >= rounds)
    )


def adapted(out: Path, source: str, name: str, ns: argparse.Namespace, *, bn: bool, pseudo: bool) -> dict:
    """`train --resume` a copy of the finished model `source` with --adapt-bn and/or --pseudo-label."""
    result = out / "fake_real" / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    result.parent.mkdir(parents=True, exist_ok=True)
    model = out / "fake_real" / f"{name}.pt"
    if not model.exists():  # a copy, so that the source stays as it is; atomic
        partial = model.with_suffix(".pt.partial")
        shutil.copyfile(out / "models" / f"{source}.pt", partial)
        os.replace(partial, model)
    if not adapted_done(model, bn=bn, pseudo=pseudo, rounds=ns.rounds):
        cmd = [*FAKECIFAR, "train", "--resume", str(model), "--threads", str(ns.threads)]
        if bn:
            cmd += ["--adapt-bn", *ns.target]
        if pseudo:
            rule = (
                ["--keep-fraction", str(ns.keep_fraction)] if ns.keep_fraction else ["--threshold", str(ns.threshold)]
            )
            cmd += ["--pseudo-label", *ns.target, *rule, "--rounds", str(ns.rounds)]
        run(cmd, out / "logs" / f"fake_real-{name}.log")
    metrics = evaluate(model, ns.test, ns.val)
    result.write_text(json.dumps(metrics))
    return metrics


def selection_top1(out: Path, name: str, select: list[str]) -> float:
    """Top-1 of models/NAME.pt on the selection split (cached)."""
    cache = out / "fake_real" / f"select-{name}.json"
    if cache.exists():
        return float(json.loads(cache.read_text())["top1"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    value = top1(out / "models" / f"{name}.pt", select)
    cache.write_text(json.dumps({"top1": value, "on": select}))
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out/drop", help="bench_dropout_drop.py's output")
    ap.add_argument("--target", nargs="+", required=True, help="unlabelled real images (not the test)")
    ap.add_argument("--val", nargs="+", required=True, help="held-out generated images")
    ap.add_argument("--test", nargs="+", required=True, help="real held-out photos: reported only")
    ap.add_argument(
        "--select", nargs="+", required=True, help="held-out generated images, not --val: chooses the dropout row"
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--combined", action="store_true", help="also dropout + adapt-bn + pseudo-label")
    ap.add_argument("--threshold", type=float, default=0.9, help="without --keep-fraction")
    ap.add_argument("--keep-fraction", type=float, default=0.2, help="class-balanced pseudo-labels (0: --threshold)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    out = Path(ns.out)
    stamp(out / "fake_real", {k: v for k, v in vars(ns).items() if k not in ("threads", "seeds", "combined")})
    seeds = [int(s) for s in ns.seeds.split(",")]

    def cell(name: str) -> list[dict]:
        return [json.loads((out / "models" / f"{name.format(seed=s)}.json").read_text()) for s in seeds]

    rows: list[tuple[str, list[dict]]] = [("generated images only (no real image)", cell("base-s{seed}"))]
    for title, key, bn, pseudo in (
        ("+ adapt-bn", "bn", True, False),
        ("+ pseudo-label", "pl", False, True),
        ("+ adapt-bn + pseudo-label", "bnpl", True, True),
    ):
        rows.append((title, [adapted(out, f"base-s{s}", f"base-s{s}-{key}", ns, bn=bn, pseudo=pseudo) for s in seeds]))
    if (out / "drop.json").exists():  # the drop bench has finished: its dropout rows
        drops = json.loads((out / "drop.json").read_text())
        # Chosen on --select, held-out generated images that no scorer saw (influence and tracin
        # reduce the loss on the drop bench's --val: choosing on it would favour them).
        candidates = [k.split("/") for k in drops if not k.startswith(("base/", "random/"))]
        chosen = {
            (m, c): statistics.fmean(selection_top1(out, f"{m}-s{s}-n{c}", ns.select) for s in seeds)
            for m, c in candidates
        }
        method, count = max(chosen, key=lambda k: chosen[k])
        rows[1:1] = [
            (f"+ dropout: {method}, {count} images (chosen on --select)", cell(f"{method}-s{{seed}}-n{count}")),
            (f"  control: random removal of {count}", cell(f"random-s{{seed}}-n{count}")),
        ]
        if ns.combined:
            name = f"{method}-s{{s}}-n{count}"
            combo = [
                adapted(out, name.format(s=s), name.format(s=s) + "-bnpl", ns, bn=True, pseudo=True) for s in seeds
            ]
            rows.append(("+ dropout + adapt-bn + pseudo-label", combo))

    def stat(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.fmean(values):.2f} ± {100 * spread:.2f}"

    lines = [
        f"seeds {ns.seeds}; unlabelled target: {', '.join(ns.target)}; "
        + (f"--keep-fraction {ns.keep_fraction}" if ns.keep_fraction else f"--threshold {ns.threshold}")
        + f" --rounds {ns.rounds} (fixed beforehand, not tuned); mean ± sample std",
        "",
        "| training | real top-1 (test, reported only) | held-out generated top-1 |",
        "|---|---:|---:|",
    ]
    for title, metrics in rows:
        lines.append(
            f"| {title} | {stat([m['test_top1'] for m in metrics])} | {stat([m['val_top1'] for m in metrics])} |"
        )
    table = "\n".join(lines)
    (out / "fake_real.md").write_text(table + "\n")
    (out / "fake_real.json").write_text(json.dumps(dict(rows), indent=1))
    print(table)


if __name__ == "__main__":
    main()
