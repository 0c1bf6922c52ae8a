"""Where is the real-vs-generated signal at 32x32? Short, equal-budget ablations of the detector
(issue 14): each arm is one change to a base recipe, trained on the same fixed subset with the
same seeds, scored on a validation subset; writes ablate.md and ablate.json under --out.

    .venv/bin/python bench/bench_detect_ablate.py --split build/detector/split --out bench/out/ablate \\
        --train-images 20000 --val-images 5000 --epochs 2 --seeds 0 --jobs 2

Both subsets come from `make detector`'s *training* split (seeded `fakecifar split`s of it): the
held-out split the detector is finally measured on is never trained on, scored or selected on
here. Every arm trains `--target origin` for the same --epochs at the base recipe's schedule
(equal epochs, not equal compute: +hires, wide and deep cost ~2.5x, see the seconds); the width
vs depth arms compare models of about equal FLOPs (wrn-16-2 vs resnet56); `tta` scores the base
models with flip test-time augmentation. Outputs are kept: a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from common import complete, stamp

FAKECIFAR = [sys.executable, "-m", "fakecifar"]
MEMBER_SEED_STEP = 1000
BASE = "--model resnet20 --schedule onecycle --lr 0.2 --batch-size 256 --augment crop,flip --precision fp32"

# name: (what changes, train options replacing the base's where they overlap)
ARMS: dict[str, tuple[str, str | None]] = {
    "base": ("resnet20, crop+flip, one-cycle lr 0.2, batch 256", ""),
    "stem2": ("early downsampling: stride-2 first conv", "--model resnet20+stem2"),
    "hires": ("no downsampling before stage 3", "--model resnet20+hires"),
    "highpass": ("+ fixed high-pass branch beside RGB", "--model resnet20+highpass"),
    "dct": ("+ fixed 8x8 block-DCT magnitude branch beside RGB", "--model resnet20+dct"),
    "wide": ("wider-shallower: wrn-16-2 (~equal FLOPs to resnet56)", "--model wrn-16-2"),
    "deep": ("deeper-narrower: resnet56", "--model resnet56"),
    "flip-only": ("no crop (flip only)", "--augment flip"),
    "jpeg": ("+ JPEG re-compression (quality 50-95) on half the images", "--augment crop,flip,jpeg"),
    "blur": ("+ Gaussian blur (sigma 0.4-1.2) on half the images", "--augment crop,flip,blur"),
    "resize": ("+ down-and-up resize (50-87.5%) on half the images", "--augment crop,flip,resize"),
    "smooth": ("+ label smoothing 0.1", "--label-smoothing 0.1"),
    "ema": ("+ EMA of the weights (0.99 per step)", "--ema 0.99"),
    "whiten": ("+ whitened first conv", "--whiten"),
    "tta": ("base models scored with flip TTA", None),
    # the winners together
    "highpass+whiten": ("high-pass branch + whitened first conv", "--model resnet20+highpass --whiten"),
    "highpass+smooth": ("high-pass branch + label smoothing 0.1", "--model resnet20+highpass --label-smoothing 0.1"),
    "highpass+blur": ("high-pass branch + blur augmentation", "--model resnet20+highpass --augment crop,flip,blur"),
    "wide+highpass": ("wrn-16-2 + high-pass branch", "--model wrn-16-2+highpass"),
    # an ensemble of the winning recipe, and one model distilled from it
    "ensemble3": (
        f"mean P(fake) of 3 highpass+whiten models (seeds s, s+{MEMBER_SEED_STEP}, ...), 3x the training",
        None,
    ),
    "ens-distill": ("highpass+whiten student distilled (KL, T=4) from ensemble3 on the same images", None),
}
ENSEMBLE_OF = "highpass+whiten"


def merged(base: str, change: str) -> list[str]:
    """The base options with `change`'s options replacing the same flags."""
    out: dict[str, list[str]] = {}
    for text in (base, change):
        words = shlex.split(text)
        i = 0
        while i < len(words):
            flag, values = words[i], []
            i += 1
            while i < len(words) and not words[i].startswith("--"):
                values.append(words[i])
                i += 1
            out[flag] = values
    return [w for flag, values in out.items() for w in (flag, *values)]


def subsets(ns: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """Seeded subsets of the detector's training split: (train, val), disjoint."""
    train_split = Path(ns.split) / "train"
    total = int(json.loads((train_split / "manifest.json").read_text())["images"])
    cut = out / "cut"
    if not complete(cut / "val"):
        # val part of a first split = the ablation's training images; of a second, its val images
        share = ns.train_images + ns.val_images
        rest = max(1, total - share)
        cmd = [*FAKECIFAR, "split", str(train_split), "--ratio", f"{rest}:{share}", "--seed", "11", "-o", str(cut)]
        subprocess.run([*cmd, "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    parts = out / "parts"
    if not complete(parts / "val"):
        cmd = [*FAKECIFAR, "split", str(cut / "val"), "--ratio", f"{ns.train_images}:{ns.val_images}", "--seed", "12"]
        subprocess.run([*cmd, "-o", str(parts), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return parts / "train", parts / "val"


def run_logged(cmd: list[str], log: Path) -> float:
    """Run `cmd` with its output in `log`; returns its wall clock in seconds."""
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    start = time.monotonic()
    with log.open("w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.monotonic() - start


def train_arm(name: str, seed: int, data: Path, ns: argparse.Namespace, out: Path) -> tuple[Path, float]:
    """Train arm `name` at `seed` (with an .onnx beside it), unless a run before did."""
    model = out / "runs" / f"{name}-s{seed}.pt"
    seconds_file = model.with_suffix(".seconds")
    if model.with_suffix(".onnx").exists() and seconds_file.exists():
        return model, float(seconds_file.read_text())
    options = merged(BASE, ARMS[name][1] or "") + ["--epochs", str(ns.epochs), "--threads", str(ns.threads)]
    cmd = [*FAKECIFAR, "train", str(data), "--target", "origin", *options, "--seed", str(seed), "-o", str(model)]
    seconds = run_logged([*cmd, "--onnx", "--overwrite"], model.with_suffix(".log"))
    seconds_file.write_text(f"{seconds}\n")
    return model, seconds


def ensemble_arm(seed: int, data: Path, ns: argparse.Namespace, out: Path) -> tuple[Path, float, int]:
    """The mean of three ENSEMBLE_OF models (seeds s, s+1000, s+2000) as one .onnx; returns it,
    the members' training seconds and their parameters, summed."""
    from fakecifar.ensemble import ensemble_onnx

    members = [train_arm(ENSEMBLE_OF, seed + k * MEMBER_SEED_STEP, data, ns, out) for k in range(3)]
    onnx_files = [m.with_suffix(".onnx") for m, _ in members]
    merged_model = ensemble_onnx(onnx_files, out / "runs" / f"ensemble3-s{seed}.onnx")
    return merged_model, sum(s for _, s in members), sum(params_of(m) for m, _ in members)


def distill_arm(seed: int, data: Path, ns: argparse.Namespace, out: Path, teacher: Path) -> tuple[Path, float]:
    """An ENSEMBLE_OF student distilled from `teacher` (the ensemble) on the training subset."""
    student = out / "runs" / f"ens-distill-s{seed}.pt"
    options = merged(BASE, ARMS[ENSEMBLE_OF][1] or "") + ["--epochs", str(ns.epochs), "--threads", str(ns.threads)]
    # The teacher answers real/fake, the transfer shards are labelled by CIFAR class: --map-classes
    # keeps the images and leaves them to the teacher's answers (no class of its matches). The
    # student is scored on `val` by run_arm, as every arm is.
    cmd = [*FAKECIFAR, "distill", "--teacher", str(teacher), "--transfer", str(data), "--map-classes", *options]
    cmd += ["--seed", str(seed), "-o", str(student), "--overwrite"]
    return student, run_logged(cmd, student.with_suffix(".log"))


def run_arm(name: str, seed: int, data: Path, val: Path, ns: argparse.Namespace, out: Path, waits=None) -> dict:
    """Train the arm and score it on `val`. `waits`: the future of an arm this one needs first
    (tta scores base's models, ensemble3 reuses highpass+whiten's, ens-distill learns from ensemble3)."""
    result = out / "runs" / f"{name}-s{seed}.json"
    if result.exists():
        return json.loads(result.read_text())
    result.parent.mkdir(parents=True, exist_ok=True)
    seconds: float | None = None
    if waits is not None:
        waits.result()  # raises if that arm failed
    params = None
    if name == "tta":
        model = out / "runs" / f"base-s{seed}.pt"
    elif name == "ensemble3":
        model, seconds, params = ensemble_arm(seed, data, ns, out)
    elif name == "ens-distill":
        model, seconds = distill_arm(seed, data, ns, out, out / "runs" / f"ensemble3-s{seed}.onnx")
    else:
        model, seconds = train_arm(name, seed, data, ns, out)
    cmd = [*FAKECIFAR, "eval", str(model), "--on", str(val), "--json", "--threads", str(ns.threads)]
    lines = subprocess.run(cmd + (["--tta"] if name == "tta" else []), capture_output=True, text=True, check=True)
    metrics = json.loads(lines.stdout.splitlines()[0])
    record = {"val_top1": metrics["top1"], "seconds": seconds, "params": params or params_of(model)}
    result.write_text(json.dumps(record))
    return record


def params_of(model: Path) -> int:
    from fakecifar.checkpoint import load_checkpoint
    from fakecifar.models import count_params

    return count_params(load_checkpoint(model)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="build/detector/split", help="make detector's split (train/ is used)")
    ap.add_argument("--out", default="bench/out/ablate")
    ap.add_argument("--train-images", type=int, default=20_000)
    ap.add_argument("--val-images", type=int, default=5_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ns = ap.parse_args()
    out = Path(ns.out)
    stamp(out, {k: v for k, v in vars(ns).items() if k not in ("jobs", "threads", "seeds", "arms")})
    data, val = subsets(ns, out)
    arms = ns.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    seeds = [int(s) for s in ns.seeds.split(",")]
    if "tta" in arms and "base" not in arms:
        sys.exit("the tta arm scores the base arm's models: add base to --arms")
    if "ens-distill" in arms and "ensemble3" not in arms:
        sys.exit("the ens-distill arm learns from the ensemble3 arm's models: add ensemble3 to --arms")
    waits_for = {"tta": "base", "ens-distill": "ensemble3"}
    if ENSEMBLE_OF in arms:
        waits_for["ensemble3"] = ENSEMBLE_OF  # its seed-s member is that arm's model: not trained twice at once
    # the arms others wait for first, the waiting ones last
    order = sorted(arms, key=lambda a: (a not in waits_for.values(), a in waits_for))
    # Submitted in order, so a job waits only for one the pool has already started.
    with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
        jobs: dict[tuple[str, int], Future] = {}
        for s in seeds:
            for a in order:
                waits = jobs.get((waits_for[a], s)) if a in waits_for else None
                jobs[(a, s)] = pool.submit(run_arm, a, s, data, val, ns, out, waits)
    results = {key: job.result() for key, job in jobs.items()}
    base = [results[("base", s)]["val_top1"] for s in seeds] if "base" in arms else []
    base_mean = statistics.fmean(base) if base else None
    lines = [
        f"`train --target origin {BASE} --epochs {ns.epochs}` + the arm's change; {ns.train_images:,} training and "
        f"{ns.val_images:,} validation images, both from {ns.split}/train; seeds {ns.seeds}; mean ± sample std",
        "",
        f"| arm | change | params | val accuracy | vs base | train s ({ns.threads} thread(s), {ns.jobs} job(s)) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for arm in arms:
        values = [results[(arm, s)]["val_top1"] for s in seeds]
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        delta = f"{100 * (mean - base_mean):+.2f}" if base_mean is not None and arm != "base" else ""
        secs = [results[(arm, s)]["seconds"] for s in seeds if results[(arm, s)]["seconds"]]
        params = results[(arm, seeds[0])]["params"]
        lines.append(
            f"| {arm} | {ARMS[arm][0]} | {params / 1e6:.2f}M | {100 * mean:.2f} ± {100 * spread:.2f} | {delta} | "
            f"{statistics.fmean(secs):.0f} |"
            if secs
            else f"| {arm} | {ARMS[arm][0]} | {params / 1e6:.2f}M | {100 * mean:.2f} ± {100 * spread:.2f} | {delta} | |"
        )
    table = "\n".join(lines)
    (out / "ablate.md").write_text(table + "\n")
    (out / "ablate.json").write_text(json.dumps({f"{a}/{s}": r for (a, s), r in results.items()}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
