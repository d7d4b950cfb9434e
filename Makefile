# Two commands on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
IMAGES ?=
OUT    ?= out/demo

.PHONY: install test demo demo-decompositions bench bench-pipeline bench-tokens bench-train bench-store-codecs bench-scale gpu-check clean

install: $(STAMP)

# Re-install when the dependency list changes; `touch setup.cfg` forces it.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,demo,bench]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m nextdetail.demo --out $(OUT) $(if $(IMAGES),--images $(IMAGES),)

# The paper's three decompositions (base-detail, intrinsic, specular) of the same photos.
demo-decompositions: $(STAMP)
	$(PY) -m nextdetail.demo --decompositions --out $(OUT)-decompositions $(if $(IMAGES),--images $(IMAGES),)

bench: $(STAMP)
	$(PY) benchmarks/bench_decomp.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_tokens.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_tokenizer.py

bench-pipeline: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

bench-store-codecs: $(STAMP)
	$(PY) benchmarks/bench_store_codecs.py

# The store's cost against N (1k, 10k, 100k images at 64 px): about 20 minutes on 2 cores.
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_store_scale.py

bench-tokens: $(STAMP)
	$(PY) benchmarks/bench_tokens.py

bench-train: $(STAMP)
	$(PY) benchmarks/bench_train.py

# On a GPU machine, with its own Python (torch, cupy, numba; no venv to build there):
# every GPU path measured in one short run (benchmarks/gpu_check.py). GPU_PYTHON=.venv/bin/python
# here runs it too (add GPU_CHECK=--dry-run on a machine without a GPU).
GPU_PYTHON ?= python3
GPU_CHECK ?=
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out out/gpu-check.json $(GPU_CHECK)

clean:
	rm -rf $(VENV) out .pytest_cache
