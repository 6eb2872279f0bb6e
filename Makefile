# make test   : create .venv on first use, install everything, run the fast suite
# make test-slow : the slow tests too (real SmolLM2 model at long windows)
# make demo   : the paper in miniature (see README): PI vs direct fine-tuning, ~6 minutes
# make reproduce : every arm, factor and checkpoint of the miniature (hours; resumable) -> results/miniature
# make reproduce-real : the paper on SmolLM2-135M, 8K -> 32K by PI and direct fine-tuning (one GPU)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo reproduce reproduce-real reproduce-real-reduced smollm2 bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: $(STAMP)
	PI_JAX_NATIVE_REQUIRED=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

# The paper in miniature on a CPU (about 6 minutes on 2 cores once .venv exists): runs/demo/report.md
demo: $(STAMP)
	$(BIN)/python demo.py

# Every arm of the miniature (hours on 2 cores; rerun to resume): results/miniature/
reproduce: $(STAMP)
	$(BIN)/python demo.py --full

# The paper's experiment on SmolLM2-135M, 8192 -> 32768 (one H100-class GPU, ~8 minutes by its
# printed estimate): runs/real_full/report.md. The CPU size (8192 -> 16384, hours; resumable):
reproduce-real: $(STAMP)
	$(BIN)/python demo.py --real

reproduce-real-reduced: $(STAMP)
	$(BIN)/python demo.py --real --reduced

smollm2: $(STAMP)
	$(BIN)/python -m convert.fetch smollm2

bench: $(STAMP)
	$(BIN)/python -m benchmarks.cpu_forward

clean:
	rm -rf $(VENV) .cache runs
