#!/bin/sh
# The 4-way Real/Fake table (issue 3): a classifier trained on real CIFAR-10 photos and one
# trained on Stable Diffusion images of the same ten classes (CIFAKE FAKE), each evaluated on a
# held-out split of both. Rows: model (trained on), columns: dataset (evaluated on), cells:
# top-1 accuracy over the ten classes.
#
#   sh bench/realfake_table.sh                      # fast recipe, 16 epochs (~2 x 12 min on 2 CPU cores)
#   EPOCHS=4 sh bench/realfake_table.sh             # a quicker, less accurate table
#   RECIPE=standard MODEL=resnet20 EPOCHS=30 sh bench/realfake_table.sh
#
# Environment: DATA (default ../shared/data), OUT (default bench/out/realfake), FC (the
# fakecifar command, default .venv/bin/fakecifar), RECIPE (fast), EPOCHS, MODEL, SEED (0).
# On a machine shared with other jobs, OMP_NUM_THREADS=1 avoids thread thrashing.
set -eu

DATA=${DATA:-../shared/data}
OUT=${OUT:-bench/out/realfake}
FC=${FC:-.venv/bin/fakecifar}
RECIPE=${RECIPE:-fast}
SEED=${SEED:-0}
EPOCHS_OPT=${EPOCHS:+--epochs $EPOCHS}
MODEL_OPT=${MODEL:+--model $MODEL}

mkdir -p "$OUT"

# 1. Shards. Real: the CIFAR-10 training JPEGs (marked origin=real). Fake: the FAKE folder of
#    CIFAKE's training set (CIFAKE's REAL folder holds the same JPEGs as above). Both are
#    deduplicated by pixel hash: CIFAKE has byte-identical duplicates.
if [ ! -d "$OUT/real-all" ]; then
    $FC import "$DATA/cifar10-train-jpg.tar.gz" --origin real --dedup -o "$OUT/real-all" > /dev/null
fi
if [ ! -d "$OUT/fake-all" ]; then
    rm -rf "$OUT/cifake-fake"
    mkdir -p "$OUT/cifake-fake"
    tar -xzf "$DATA/cifake-train.tar.gz" -C "$OUT/cifake-fake" train/FAKE
    $FC import "$OUT/cifake-fake" --dedup -o "$OUT/fake-all" > /dev/null
    rm -rf "$OUT/cifake-fake"
fi

# 2. Held-out splits (5:1, seeded, stratified; identical images never straddle the split).
for d in real fake; do
    [ -d "$OUT/$d/val" ] || $FC split "$OUT/$d-all" --ratio 5:1 --seed "$SEED" -o "$OUT/$d" > /dev/null
done

# 3. One model per source, each validated on its own held-out split.
#    An interrupted run (Ctrl-C, or killed after an epoch) is resumed where it stopped.
for d in real fake; do
    [ -f "$OUT/$d.done" ] && continue
    if [ -f "$OUT/$d.pt" ]; then
        $FC train "$OUT/$d/train" --resume "$OUT/$d.pt" --log "$OUT/$d.jsonl" > /dev/null
    else
        # shellcheck disable=SC2086 # the *_OPT variables are empty or two words on purpose
        $FC train "$OUT/$d/train" --recipe "$RECIPE" $EPOCHS_OPT $MODEL_OPT --seed "$SEED" \
            --val "$OUT/$d/val" --log "$OUT/$d.jsonl" -o "$OUT/$d.pt" --overwrite > /dev/null
    fi
    touch "$OUT/$d.done"
done

# 4. The 2x2 table (add --tta for flip test-time augmentation, --json for every metric).
$FC eval "$OUT/real.pt" "$OUT/fake.pt" --on "$OUT/real/val" "$OUT/fake/val"
