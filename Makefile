# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup mediapipe-env demo evidence fusion toy-model test clean

setup: $(VENV)/.installed

# torch is pinned first so nothing later pulls a CUDA build; override TORCH on GPU hosts.
# constraints.txt pins the rest of the stack to the versions the tests pass with.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

# face_quality's and hand_detection's detectors (mediapipe 0.10.21, the last release that ships them) need
# numpy<2, which the main stack cannot have: they run in this interpreter of its own (TEXFORCE_MEDIAPIPE_PYTHON).
MEDIAPIPE_VENV ?= .venv-mediapipe
mediapipe-env: $(MEDIAPIPE_VENV)/.installed

$(MEDIAPIPE_VENV)/.installed:
	$(PYTHON) -m venv $(MEDIAPIPE_VENV)
	$(MEDIAPIPE_VENV)/bin/pip install -q "mediapipe==0.10.21" "numpy<2"
	touch $@

# The demo trains on the committed toy-world model (models/toy-sd, sha256 in models/toy-sd/SHA256SUMS).
demo: setup
	cd models/toy-sd && sha256sum --quiet -c SHA256SUMS
	$(BIN)/texforce train --config configs/tiny.yaml run_name=tiny-$$(date +%Y%m%d-%H%M%S)

# The papers' table at toy scale (bench/evidence.py): base, TexForce, DDPO, ReFL and their fusions,
# 3 seeds each, scored on the held-out prompts, two models at a time. A finished (method, seed) in
# runs/evidence is reused.
evidence: setup
	cd models/toy-sd && sha256sum --quiet -c SHA256SUMS
	$(BIN)/python bench/evidence.py --out runs/evidence --jobs 2

# Fusion of LoRAs trained for different rewards: a colour and a shape text-encoder LoRA (3 seeds),
# each alone and fused; then seed 0's pair, the 5x5 grid of alphas against `texforce tune`.
fusion: setup
	cd models/toy-sd && sha256sum --quiet -c SHA256SUMS
	$(BIN)/python bench/evidence.py --out runs/evidence --jobs 2 --methods texforce_color texforce_shape "color + shape"
	$(BIN)/python bench/fusion_search.py --out runs/fusion_search

# The command that built models/toy-sd (~13 min on 2 cores). Bit-identical only on the same CPU
# instruction set and thread count, hence the committed copy.
toy-model: setup
	$(BIN)/texforce make-tiny runs/toy-sd-rebuilt --pretrain-steps 4000 --vae-steps 1000 --scenes train

# The detectors' tests run on $(MEDIAPIPE_VENV) when `make mediapipe-env` built it (CI does), else they skip.
# TEST_WORKERS pytest processes (pytest-xdist) share the tests out as each finishes one: the tests run torch on one
# thread, so one process leaves the second core idle for most of the suite (0: one process, as plain pytest).
TEST_WORKERS ?= 2
test: setup
	if [ -z "$${TEXFORCE_MEDIAPIPE_PYTHON:-}" ] && [ -f $(MEDIAPIPE_VENV)/.installed ]; then \
		export TEXFORCE_MEDIAPIPE_PYTHON="$(abspath $(MEDIAPIPE_VENV))/bin/python"; fi; \
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) $(MEDIAPIPE_VENV) runs .pytest_cache
