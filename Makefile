# make test       create .venv if missing, install pinned dev requirements, build, run the tests (what CI runs)
# make demo       same set-up, then `python -m convmixer_kernels demo`
# make gpu-check  on the lent GPU machine (nothing installed there): build for sm_90a, test, benchmark -> $(OUT)
# make bench      every benchmark suite on this machine -> benchmarks/results/<device>-<date>.{csv,md,png}

VENV   ?= .venv
PY     := $(VENV)/bin/python
JOBS   ?= $(shell nproc)
OUT    ?= $(CURDIR)/out

.PHONY: test demo build venv gpu-check bench clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

build: venv
	MAX_JOBS=$${MAX_JOBS:-$(JOBS)} $(PY) -m pip install -q -e . --no-build-isolation --no-deps

test: build
	$(PY) -m convmixer_kernels info
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m convmixer_kernels demo

bench: build
	$(PY) -m benchmarks.run --out benchmarks/results
	$(PY) -m benchmarks.plot $$(ls -t benchmarks/results/*.csv | head -1)

gpu-check:
	OUT=$(OUT) bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info convmixer_kernels/*.so
