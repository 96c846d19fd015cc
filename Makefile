# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1
CUDA_HOME   ?= $(shell [ -d /usr/local/cuda ] && echo /usr/local/cuda)
# Compile every .cu file on CPU-only CI machines too; one architecture keeps CI fast.
# Set D2G_CUDA_ARCHS= (empty) to let setup.py choose (the visible GPU, else 8.0;9.0+PTX).
D2G_CUDA_ARCHS ?= 9.0
GPU_OUT     ?= gpu_check_out

PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
export CUDA_HOME D2G_CUDA_ARCHS

.PHONY: venv install build test test-fast demo bench gpu-check cmake clean

$(VENV)/.deps-stamp: setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" ninja "setuptools>=64,<81" wheel cmake
	$(PIP) install -q pytest pytest-benchmark "diffusers>=0.30" "transformers>=4.40" peft safetensors tqdm numpy "clean-fid==0.1.35" "scipy<1.18" matplotlib
	# Comparison targets (official E-LatentLPIPS and LPIPS) of the `compare` parity tests and the
	# benchmarks. No fallback: a failed install fails here, and .ci/run fails when a comparison
	# test skips. TORCH_SPEC again, so the resolver picks a torchvision for this torch.
	$(PIP) install -q "$(TORCH_SPEC)" torchvision "elatentlpips==0.2" "lpips==0.1.4"
	touch $@

venv: $(VENV)/.deps-stamp

# The package is installed editable (Python files only, once); the extension d2g_fast._C is
# then built ahead of time, in place, by ninja in build/ (incremental: only changed sources are
# recompiled). flock serialises concurrent builds. `pip install .` builds everything in one go.
$(VENV)/.install-stamp: $(VENV)/.deps-stamp setup.py
	D2G_SKIP_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e ".[test]"
	touch $@

install build: $(VENV)/.install-stamp
	flock /tmp/d2g_fast_build.lock $(PY) setup.py -q build_ext --inplace

# PYTEST_ARGS: extra pytest arguments (.ci/run adds its plugin .ci/ci_require_compare.py);
# they come last, so e.g. PYTEST_ARGS=--durations=0 overrides the 30 slowest tests printed.
PYTEST_ARGS ?=
test: build
	$(PY) -m pytest -q --durations=30 tests $(PYTEST_ARGS)

demo: build
	$(PY) -m d2g_fast.demo

# CPU benchmarks at CPU-friendly shapes; BENCH_ARGS="" for the issues' full CPU shapes (slow).
# The same cases twice: run.py's interleaved tables (benchmarks/out/), then pytest-benchmark
# (saved in .benchmarks/; compare two runs with `pytest-benchmark compare`); BENCH_PYTEST_ARGS
# "--bench-full" for the full shapes.
BENCH_ARGS ?= --quick --min-time 0.2
BENCH_PYTEST_ARGS ?=
bench: build
	$(PY) benchmarks/run.py --device cpu $(BENCH_ARGS)
	$(PY) -m pytest benchmarks/ --benchmark-only --bench-device cpu --benchmark-autosave $(BENCH_PYTEST_ARGS)

gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_OUT)

# The same csrc/ tree built with CMake against libtorch (IDE, compile_commands.json, sanitizers).
cmake: venv
	bash tools/cmake_build.sh

clean:
	rm -rf build cmake-build d2g_fast/_C*.so *.egg-info
