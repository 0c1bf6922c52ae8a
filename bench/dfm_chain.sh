#!/bin/sh
# The Data-from-Model chain (Benz et al.): M0 -> D1 = extract(M0) -> M1 = train(D1) -> D2 ...
# from a standard and from an adversarially trained ("robust") VGG-8, with the accuracy of
# every model on real held-out CIFAR-10 images and its L2 PGD robustness, then the
# cross-architecture table (D1 of the standard chain, students of other families).
#
#   sh bench/dfm_chain.sh REAL_TRAIN REAL_HELDOUT BACKGROUND WORKDIR
#
# REAL_TRAIN: labelled real shards for M0 (e.g. a 4:1 split of cifar10-train-jpg, `train`);
# REAL_HELDOUT: the real held-out side (`val`), only ever reported; BACKGROUND: the substitute
# images dfm starts from (e.g. CIFAKE FAKE: generated, no real image). Every step is skipped
# when its output exists, so the script can be stopped and rerun. Sizes (CPU defaults, the
# paper used 500k images and a GPU): N images per extracted set, STEPS chain steps. TARGETS:
# the intended classes of dfm -- `balanced` is the paper's (random virtual logits), `teacher`
# the teacher's top class on each background image: at a few thousand images a fresh student
# learns nothing from balanced targets (11.2% on real images, docs/extract.md), so the CPU
# chain uses teacher. LR: --soft l2 on logits of ~20 diverges at train's 0.1 and at 0.05.
set -eu
REAL_TRAIN=$1 HELDOUT=$2 BACKGROUND=$3 WORK=$4
N=${N:-1000} STEPS=${STEPS:-3} M0_EPOCHS=${M0_EPOCHS:-8} ROBUST_EPOCHS=${ROBUST_EPOCHS:-3}
CHAINS=${CHAINS:-std rob} REPORT=${REPORT:-yes}
EPOCHS=${EPOCHS:-10} THREADS=${THREADS:-2} ARCH=${ARCH:-vgg8} TARGETS=${TARGETS:-teacher} LR=${LR:-0.01} ROBUST_LR=${ROBUST_LR:-0.05}
F=${FAKECIFAR:-fakecifar}
mkdir -p "$WORK"
cd "$WORK"

# A 200-image subset of the held-out split for the attacks (20 PGD steps per radius).
[ -d attack-set ] || $F split "$HELDOUT" --ratio 49:1 --seed 0 -o attack-split >/dev/null
[ -d attack-set ] || mv attack-split/val attack-set

case "$CHAINS" in *std*) [ -f m0-std.pt ] ||
    $F train "$REAL_TRAIN" --model "$ARCH" --epochs "$M0_EPOCHS" --threads "$THREADS" -o m0-std.pt ;; esac
case "$CHAINS" in *rob*) [ -f m0-rob.pt ] || $F train "$REAL_TRAIN" --model "$ARCH" --epochs "$ROBUST_EPOCHS" --lr "$ROBUST_LR" --adv pgd-l2 \
    --adv-eps 0.5 --adv-steps 2 --threads "$THREADS" -o m0-rob.pt ;; esac

for chain in $CHAINS; do
    k=0
    while [ "$k" -lt "$STEPS" ]; do
        next=$((k + 1))
        [ -f "d$next-$chain/manifest.json" ] && grep -q '"complete": true' "d$next-$chain/manifest.json" ||
            $F extract --teacher "m$k-$chain.pt" --method dfm --background "$BACKGROUND" -n "$N" --seed "$k" \
                --targets "$TARGETS" --threads "$THREADS" -o "d$next-$chain" >/dev/null
        [ -f "m$next-$chain.pt" ] || $F train "d$next-$chain" --soft l2 --model "$ARCH" --epochs "$EPOCHS" \
            --lr "$LR" --threads "$THREADS" -o "m$next-$chain.pt" >/dev/null
        k=$next
    done
done

[ "$REPORT" = yes ] || exit 0
echo "## accuracy on the real held-out split"
$F eval m*-std.pt m*-rob.pt --on "$HELDOUT" --json > accuracy.jsonl
cat accuracy.jsonl
echo "## L2 PGD robustness (20 steps, step 2.5*eps/steps) on 200 held-out images"
$F eval m*-std.pt m*-rob.pt --on attack-set --attack pgd-l2 --eps 0,0.25,0.5,1,2 --steps 20 --json > robustness.jsonl
cat robustness.jsonl

echo "## cross-architecture: students of other families on D1 of the standard chain"
for student in resnet20 mobilenetv2 lenet5; do
    [ -f "x-$student.pt" ] || $F train d1-std --soft l2 --model "$student" --epochs "$EPOCHS" --lr "$LR" \
        --threads "$THREADS" -o "x-$student.pt" >/dev/null
done
$F eval x-*.pt --on "$HELDOUT" --json > cross.jsonl
cat cross.jsonl
