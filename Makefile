# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
# Pinned because an unpinned `torch` pulls a multi-GB CUDA build; override with e.g. `make TORCH='torch==2.5.1' test`.
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bnlab-installed

.PHONY: demo test test-all bench clean chromium

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]" "$(TORCH)"
	touch $(STAMP)

demo: $(STAMP)
	MPLBACKEND=agg $(BIN)/bnlab demo --profile quick --out runs

# The report test renders report.html in Debian's headless chromium; install it when missing (as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium could not be installed; the browser test will be skipped"

test: $(STAMP) chromium
	MPLBACKEND=agg $(BIN)/python -m pytest -q

test-all: $(STAMP) chromium
	MPLBACKEND=agg $(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs
