"""Fake -> real without a real label (issue 13): the models of bench_dropout_drop.py (trained on
generated images only), then made to work on real photos with unlabelled real images:
`train --adapt-bn` and `train --pseudo-label`; writes fake_real.md and fake_real.json in --out.

    .venv/bin/python bench/bench_fake_real.py --out bench/out/drop --target real-sub/train \\
        --val fake-split/val --test real-split/val --seeds 0,1,2

--out is bench_dropout_drop.py's (its baselines and dropout models are reused, never retrained).
Rows, each over --seeds:
- generated images only: the baseline (no real image at all);
- + dropout: the method and count whose models score best on --val (held-out generated images),
  beside random removal of the same count (the control);
- + adapt-bn / + pseudo-label / both: `train --resume MODEL` with the unlabelled --target images
  (a split of the CIFAR-10 train set, never the test images). --threshold and --rounds are the
  defaults given here, not tuned: no real label is used for any choice.
--test (real photos) is only reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench_dropout_drop import FAKECIFAR, evaluate, run


def adapted(out: Path, source: str, name: str, ns: argparse.Namespace, *, bn: bool, pseudo: bool) -> dict:
    """`train --resume` the finished model `source` with --adapt-bn and/or --pseudo-label."""
    result = out / "fake_real" / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    result.parent.mkdir(parents=True, exist_ok=True)
    model = out / "fake_real" / f"{name}.pt"
    # Resume the source's copy, so that the source stays as it is and a killed run continues.
    if not model.exists():
        model.write_bytes((out / "models" / f"{source}.pt").read_bytes())
    cmd = [*FAKECIFAR, "train", "--resume", str(model), "--threads", str(ns.threads)]
    if bn:
        cmd += ["--adapt-bn", *ns.target]
    if pseudo:
        cmd += ["--pseudo-label", *ns.target, "--threshold", str(ns.threshold), "--rounds", str(ns.rounds)]
    run(cmd, out / "logs" / f"fake_real-{name}.log")
    metrics = evaluate(model, ns.test, ns.val)
    result.write_text(json.dumps(metrics))
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out/drop", help="bench_dropout_drop.py's output")
    ap.add_argument("--target", nargs="+", required=True, help="unlabelled real images (not the test)")
    ap.add_argument("--val", nargs="+", required=True, help="held-out generated images")
    ap.add_argument("--test", nargs="+", required=True, help="real held-out photos: reported only")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    out = Path(ns.out)
    seeds = [int(s) for s in ns.seeds.split(",")]
    drops = json.loads((out / "drop.json").read_text())

    def cell(name: str) -> list[dict]:
        return [json.loads((out / "models" / f"{name.format(seed=s)}.json").read_text()) for s in seeds]

    # The dropout row: chosen on held-out generated images (mean --val top-1 over the seeds).
    candidates = {k: v for k, v in drops.items() if not k.startswith(("base/", "random/"))}
    best = max(candidates, key=lambda k: statistics.fmean(m["val_top1"] for m in candidates[k]))
    method, count = best.split("/")
    rows: list[tuple[str, list[dict]]] = [
        ("generated images only (no real image)", cell("base-s{seed}")),
        (f"+ dropout: {method}, {count} images (chosen on held-out generated)", cell(f"{method}-s{{seed}}-n{count}")),
        (f"  control: random removal of {count}", cell(f"random-s{{seed}}-n{count}")),
    ]
    for title, key, bn, pseudo in (
        ("+ adapt-bn", "bn", True, False),
        ("+ pseudo-label", "pl", False, True),
        ("+ adapt-bn + pseudo-label", "bnpl", True, True),
    ):
        rows.append((title, [adapted(out, f"base-s{s}", f"base-s{s}-{key}", ns, bn=bn, pseudo=pseudo) for s in seeds]))
    combo = [
        adapted(out, f"{method}-s{s}-n{count}", f"{method}-s{s}-n{count}-bnpl", ns, bn=True, pseudo=True) for s in seeds
    ]
    rows.append(("+ dropout + adapt-bn + pseudo-label", combo))

    def stat(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.fmean(values):.2f} ± {100 * spread:.2f}"

    lines = [
        f"seeds {ns.seeds}; unlabelled target: {', '.join(ns.target)}; --threshold {ns.threshold} "
        f"--rounds {ns.rounds} (defaults, not tuned); mean ± sample std",
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
