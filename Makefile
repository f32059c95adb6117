# prime_jax: two commands.
#   make run   set up, fetch the offline assets, train + evaluate the embedded default (configs/sotu.py)
#   make test  set up, fetch the offline assets, run the whole test suite
# (make tpu-tools: the TPU compiler for --mode compile, in .tpu/; make test installs it too.)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
TPU_STAMP  := .tpu/.installed
ASSET_GROUPS ?= text
# The tests use every offline asset (text, images, FID network, scorer LM).
TEST_ASSET_GROUPS ?= text images scorer

.PHONY: run test setup assets tpu-tools clean-venv

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# Test-only dependencies (torch CPU wheel and transformers, for parity tests against PyTorch; ruff).
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

# libtpu (requirements-tpu.txt) for --mode compile, kept out of the virtual environment: JAX would
# otherwise try it as a backend on every run. prime_jax.compile finds it in .tpu/.
$(TPU_STAMP): $(STAMP) requirements-tpu.txt
	$(PY) -m pip install -q --no-deps --upgrade --target .tpu -r requirements-tpu.txt
	touch $(TPU_STAMP)

tpu-tools: $(TPU_STAMP)

setup: $(STAMP)

assets: setup
	$(PY) -m prime_jax.data.assets fetch $(ASSET_GROUPS)

run: assets
	$(PY) -m prime_jax.main --config configs/sotu.py --workdir workdir/sotu --mode train

# Lint first (ruff: 2-space indent, 100 columns; pyproject.toml). pytest exits 5 when it collected
# nothing: that must fail, not pass silently; a skipped test fails too (tests/conftest.py). The 15
# slowest tests are listed at the end, to keep the suite within its ~15-minute budget
# (`pytest -m "not slow"` leaves out the end-to-end runs while developing).
test: $(TEST_STAMP) $(TPU_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m prime_jax.data.assets fetch $(TEST_ASSET_GROUPS)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

clean-venv:
	rm -rf $(VENV) .tpu
