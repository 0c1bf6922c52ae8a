# Two commands for a new user on a fresh clone:  make demo   and   make test
# Each creates .venv itself. torch/torchvision are pinned to the CPU-usable builds that
# pip finds on this machine's disk; elsewhere pip fetches the same versions.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FC     := $(BIN)/fakecifar
TORCH  := torch==2.14.1 torchvision==0.29.1
OUT    ?= demo-out

.PHONY: install demo test test-slow lint docs bench clean detector

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded sample: import -> resize -> stats (real vs fake) -> split -> detect.
demo: install
	rm -rf $(OUT)
	$(FC) import --sample -o $(OUT)/raw --dedup | $(FC) resize --size 16 -o $(OUT)/small | $(FC) stats --by origin
	$(FC) split $(OUT)/raw --ratio 5:1 --seed 0 -o $(OUT)/split > /dev/null
	$(FC) stats $(OUT)/split/train $(OUT)/split/val
	$(FC) detect $(OUT)/split/val | tail -n 3

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# ruff (lint, then format check) and mypy, configured in pyproject.toml; all three run and the
# target fails if any does. mypy has no package-dir mapping, so core/ and cli/ are first laid out
# as build/typecheck/fakecifar/ (symlinks); its messages are given back their source paths.
TYPECHECK := build/typecheck
lint: install
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/fakecifar && \
	for f in core/*; do case $$f in */__pycache__) ;; *) ln -s "$(CURDIR)/$$f" $(TYPECHECK)/fakecifar/ ;; esac; done && \
	ln -s "$(CURDIR)/cli" $(TYPECHECK)/fakecifar/cli && \
	{ out=$$($(BIN)/mypy $(TYPECHECK)/fakecifar scripts bench tests) || status=1; } && \
	echo "$$out" | sed -e 's|^$(TYPECHECK)/fakecifar/cli/|cli/|' -e 's|^$(TYPECHECK)/fakecifar/|core/|'; \
	exit $$status

docs: install
	$(BIN)/python scripts/gen_docs.py

bench: install
	$(BIN)/python bench/bench_loader.py
	$(BIN)/python bench/bench_resize.py
	$(BIN)/python bench/bench_startup.py

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The built-in detector (core/data/detector.onnx): the mean of two real/fake models' P(fake),
# merged into one ONNX with float16 weights (scripts/ensemble_onnx.py), both trained on CIFAKE
# train (deduplicated), with a held-out split that shares no image with training:
#   1. resnet32, whitened stem, `--target origin`, 60 epochs (DETECTOR_TRAIN; its weights are
#      kept on the held-out split's loss, as in issue 5: a known flaw, see bench/RESULTS.md);
#   2. resnet20 with a fixed high-pass branch, `--target origin+class` (20 classes), 10 epochs
#      (DETECTOR_MEMBER), on the training split less 2.5% (fit/val), which picks its weights.
# Training is seeded and deterministic on CPU, timings are kept out of the ONNX, and the merge
# is deterministic. The precision is the machine's fast one (--precision auto: bf16 autocast on
# CPUs with AMX, fp32 elsewhere -- bf16 without AMX trains ~10x slower), recorded in each
# checkpoint's train.precision. The same bytes therefore need the same data, torch build, CPU
# family (AMX or not: it picks the precision; fp32 kernels differ by ISA too), precision and
# thread count (OMP_NUM_THREADS=2 below); a test trains twice, fp32 and bf16, and compares the
# ONNX hashes. The shipped members were made on two machines: (1) bf16 on an AMX CPU, (2) fp32
# on an AMD EPYC without AVX-512. To pin a precision: DETECTOR_TRAIN='... --precision bf16'.
# Wall clock on 2 cores: (1) ~2 h on AMX in bf16 (many hours in fp32), (2) ~65 min in fp32.
CIFAKE   ?= ../shared/data/cifake-train.tar.gz
DETECTOR := build/detector
DETECTOR_TRAIN := --model resnet32 --epochs 60 --schedule onecycle --lr 0.2 --ema 0.995 --whiten --precision auto --seed 0
DETECTOR_MEMBER := --model resnet20+highpass --target origin+class --epochs 10 --schedule onecycle --lr 0.2 --ema 0.995 \
                   --whiten --precision auto --seed 0
detector: install
	rm -f $(DETECTOR)/train.jsonl $(DETECTOR)/origin-class.jsonl
	$(FC) import $(CIFAKE) --dedup -o $(DETECTOR)/cifake --overwrite > /dev/null
	$(FC) split $(DETECTOR)/cifake --ratio 5:1 --seed 0 -o $(DETECTOR)/split --overwrite > /dev/null
	$(FC) split $(DETECTOR)/split/train --ratio 39:1 --seed 1 -o $(DETECTOR)/fit --overwrite > /dev/null
	OMP_NUM_THREADS=2 $(FC) train $(DETECTOR)/split/train --val $(DETECTOR)/split/val --target origin \
	    $(DETECTOR_TRAIN) -o $(DETECTOR)/resnet32.pt --onnx --overwrite --log $(DETECTOR)/train.jsonl
	OMP_NUM_THREADS=2 $(FC) train $(DETECTOR)/fit/train --val $(DETECTOR)/fit/val --threads 2 \
	    $(DETECTOR_MEMBER) -o $(DETECTOR)/origin-class.pt --onnx --overwrite --log $(DETECTOR)/origin-class.jsonl
	$(BIN)/python scripts/ensemble_onnx.py $(DETECTOR)/resnet32.onnx $(DETECTOR)/origin-class.onnx -o $(DETECTOR)/detector.onnx
	cp $(DETECTOR)/detector.onnx core/data/detector.onnx
	$(BIN)/python bench/bench_detect.py --val $(DETECTOR)/split/val --against $(DETECTOR)/resnet32.onnx
