# Two commands for users: `make demo` and `make test`. Both set up .venv first (idempotent).
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

# Offline by design: no model or data downloads at run time; telemetry off.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-install only when the dependency pins change. constraints.txt pins every transitive
# package to the set measured working together (torch 2.13.0 = the local CPU wheel).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,pg]"
	@# DeepSpeed JIT-compiles a CPU comm op on first use (~50 s): compile it here, with the install.
	$(BIN)/python -c "from cmoe.stages.trainer import build_cpu_comm_op; build_cpu_comm_op()"
	@touch $(STAMP)

demo: setup
	$(BIN)/cmoe demo

# Three pytest workers, one torch thread each (tests/conftest.py): on two cores the third overlaps the
# waits on servers and subprocesses (604 s against 669 s with two, docs/architecture.md). Each folder
# of tests/ stays on one worker, so its session fixtures (trained lineages, the service stack) are
# built once, and folders start in the conftest's order (the long ones first), not xdist's.
TEST_WORKERS ?= 3
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

bench: setup
	$(BIN)/cmoe bench --suite coin-mini --methods cmoe,naive-expand,single-router,seq-ft,joint --out runs/bench

clean:
	rm -rf .cmoe runs
