# Everything a fresh machine needs: `make run` (main job) and `make test` (test suite).
# Both create .venv and install kd with its pinned dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd-installed

.PHONY: install run test test-all bench clean

# torch's CUDA build (the only torch >= 2.14 on PyPI, which torchaudio 2.11 needs) makes the venv
# about 6 GiB, and pip unpacks its wheels beside it: stop with a clear message before a half install.
MIN_FREE_GIB ?= 7

$(STAMP): pyproject.toml setup.py Makefile
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0) if free >= $(MIN_FREE_GIB) else sys.exit( \
	f'make: installing kd into $(CURDIR)/$(VENV) needs about $(MIN_FREE_GIB) GiB free on its disk ' \
	f'(torch with its CUDA libraries is about 6 GiB installed); only {free:.1f} GiB is free. ' \
	'Free some space, or set MIN_FREE_GIB=0 to try anyway.')"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q -e ".[dev]"
	# test-only reference code (tests/speech_students/test_s3prl_parity.py); its model needs only torch and numpy
	$(PY) -m pip install -q --no-deps s3prl==0.4.18
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (offline): GenDistiller distils the embedded Whisper tiny.en
# encoder on synthetic speech and scores teacher and student on SUPERB-style downstreams (~15 min, 2 cores).
run: $(STAMP)
	$(VENV)/bin/kd run --task superb --plugin gendistiller

# The CI suite: everything except tests marked slow. pytest's exit code 5
# ("no tests collected") fails the target like any other failure. Two pytest-xdist workers, one per core,
# each test file on one worker (its module fixtures, such as a shared tiny run, are built once); one torch
# thread per worker, as the subprocess runs of the tests already use, so the workers do not oversubscribe.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -m "not slow" -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
