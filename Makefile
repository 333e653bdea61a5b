# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The environment is a virtualenv in .venv; torch is installed first and pinned (a CPU build here),
# so no multi-GB CUDA build is pulled. An existing torch is respected: if the system Python already
# has torch (say a CUDA build on a GPU node), the venv is created with --system-site-packages and uses it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Exact versions of everything else (what the tests and measurements ran with); empty: pyproject's ranges.
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)

.PHONY: env lock demo lint test test-fast test-slow test-gpu bench-data pretrain pretrain-fkpp pretrain-lesion study-mri study-ct study-lesion bench clean

env: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the system's torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[test]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@rm -f $(VENV)/.installed-*
	@touch $@

# Rewrite constraints.txt from the environment (after `make env CONSTRAINTS=` and a green `make test`).
lock:
	@{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch==|rmr-lightning|pip==|setuptools==|wheel==)'; } > constraints.tmp
	@mv constraints.tmp constraints.txt && echo "constraints.txt: $$(grep -vc '^#' constraints.txt) packages"

# The main job on the embedded default data: pretrain (unless an artifact exists), then the
# sample-efficiency study at CPU scale. Writes results/demo/{summary.csv,summary.md,sample_efficiency.png}.
demo: env
	@test -f results/pretrain/processor.pt || $(MAKE) pretrain
	$(BIN)/rmr-study --config configs/study/demo.yaml

# Lint and format check (ruff, configured in pyproject.toml); CI runs it before the tests.
lint: env
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The full suite as CI runs it (slow tests included: ~6 min on 2 cores); test-fast skips the slow ones (~80 s).
test: env
	$(BIN)/python -m pytest -m "not gpu"

test-fast: env
	$(BIN)/python -m pytest -m "not slow and not gpu"

test-slow: env
	$(BIN)/python -m pytest -m slow

test-gpu: env
	$(BIN)/python -m pytest -m gpu

# The default processor (MPNN with edge-weighted sums on network diffusion): artifact and figures.
pretrain: env
	rm -rf results/pretrain/checkpoints
	$(BIN)/rmr fit --config configs/pretrain/ndm.yaml
	$(BIN)/rmr test --config configs/pretrain/ndm.yaml --ckpt_path last
	@cat results/pretrain/metrics.json

# The deep MLP pretrained on Gompertz growth of single lesions (results/pretrain_lesion/), for the lesion task.
pretrain-lesion: env
	rm -rf results/pretrain_lesion/checkpoints
	$(BIN)/rmr fit --config configs/pretrain/ndm.yaml --config configs/pretrain/gompertz.yaml
	$(BIN)/rmr test --config configs/pretrain/ndm.yaml --config configs/pretrain/gompertz.yaml --ckpt_path last
	@cat results/pretrain_lesion/metrics.json

# The same processor pretrained on network Fisher-KPP (results/pretrain_fkpp/), for configs/natural/fkpp.yaml.
pretrain-fkpp: env
	rm -rf results/pretrain_fkpp/checkpoints
	$(BIN)/rmr fit --config configs/pretrain/ndm.yaml --config configs/pretrain/fkpp.yaml
	$(BIN)/rmr test --config configs/pretrain/ndm.yaml --config configs/pretrain/fkpp.yaml --ckpt_path last
	@cat results/pretrain_fkpp/metrics.json

study-mri: env
	@test -f results/pretrain/processor.pt || $(MAKE) pretrain
	$(BIN)/rmr-study --config configs/study/brain_mri.yaml

study-ct: env
	@test -f results/pretrain/processor.pt || $(MAKE) pretrain
	$(BIN)/rmr-study --config configs/study/brain_ct.yaml

# The lesion-growth study (lung-nodule CT patches from a tio.Queue, Gompertz growth), CPU scale.
study-lesion: env
	@test -f results/pretrain_lesion/processor.pt || $(MAKE) pretrain-lesion
	$(BIN)/rmr-study --config configs/study/lesion_ct.yaml

# The manifest data path at cohort scale: validation, preprocessing cache, memory, cached vs resident steps.
bench-data: env
	$(BIN)/python scripts/bench_data.py --subjects 200,2000 --spacing 2 --out results/bench/data_path.json

bench: env
	$(BIN)/python scripts/bench_processors.py
	$(BIN)/python scripts/bench_logging.py

clean:
	rm -rf results lightning_logs wandb
