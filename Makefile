# AlexNet in one CUDA file.
#   make            CPU build (always) + GPU build (when nvcc is found)
#   make demo       the main job on the built-in default
#   make test       virtual environment + build + the test suite (CPU only)
#   make test-slow  the heavier tests
#   make test-asan  the test suite on an AddressSanitizer/UBSan CPU build
#   make bench-kernels  the per-kernel benchmark (CPU build; GPU build when nvcc is found)
#   make gpu-check  dev/gpu_check.sh: build, test, sanitize, compare and benchmark on a GPU
#   make clean
# No step needs a GPU: nvcc compiles and links without one.

CXX      ?= g++
PYTHON   ?= python3
NVCC     ?= $(shell command -v nvcc 2>/dev/null)
GPU_ARCH ?= 70 80 90
VENV     := .venv
PY       := $(VENV)/bin/python

CPU_FLAGS  := -std=c++17 -O2 -g -pthread -fPIC -Wall -Wextra -Wno-unused-parameter -Wno-unused-function
ASAN_FLAGS := -std=c++17 -O1 -g -pthread -fPIC -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
NVCC_FLAGS := -std=c++17 -O3 -lineinfo -Xptxas -v -Xcompiler -fPIC $(foreach a,$(GPU_ARCH),-gencode arch=compute_$(a),code=sm_$(a))
SOURCES    := train_alexnet.cu dev/cuda_cpu.h

.PHONY: all cpu gpu demo test test-slow test-asan venv clean bench-kernels bench-kernels-cpu bench-kernels-gpu gpu-check
all: cpu gpu

# --- CPU build: the same .cu through g++ and the CUDA-on-CPU runtime ---------
cpu: train_alexnet_cpu libalexnet_cpu.so
	@echo "built CPU build: train_alexnet_cpu libalexnet_cpu.so"

build/cpu/train_alexnet.o: $(SOURCES)
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) -x c++ -c train_alexnet.cu -o $@

train_alexnet_cpu: build/cpu/train_alexnet.o
	$(CXX) -pthread $< -o $@

libalexnet_cpu.so: build/cpu/train_alexnet.o
	$(CXX) -pthread -shared $< -o $@

build/asan/libalexnet_cpu.so: $(SOURCES)
	@mkdir -p $(@D)
	$(CXX) $(ASAN_FLAGS) -x c++ -shared train_alexnet.cu -o $@

# --- GPU build: nvcc, sm_70/80/90 by default (make GPU_ARCH=90 for one) -------
ifneq ($(NVCC),)
gpu: train_alexnet libalexnet.so
	@echo "built GPU build with $(NVCC) for sm_$(GPU_ARCH): train_alexnet libalexnet.so (ptxas report: build/gpu/ptxas.log)"

build/gpu/train_alexnet.o: train_alexnet.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@ 2> build/gpu/ptxas.log || { cat build/gpu/ptxas.log; exit 1; }

train_alexnet: build/gpu/train_alexnet.o
	$(NVCC) $(NVCC_FLAGS) $< -o $@

libalexnet.so: build/gpu/train_alexnet.o
	$(NVCC) $(NVCC_FLAGS) -shared $< -o $@
else
gpu:
	@echo "nvcc not found: skipped the GPU build (train_alexnet, libalexnet.so)"
endif

# --- per-kernel benchmark: dev/bench_kernels.cu includes train_alexnet.cu ------
bench-kernels: bench-kernels-cpu bench-kernels-gpu
bench-kernels-cpu: build/cpu/bench_kernels

build/cpu/bench_kernels: dev/bench_kernels.cu $(SOURCES)
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) -x c++ $< -o $@

ifneq ($(NVCC),)
bench-kernels-gpu: build/gpu/bench_kernels

build/gpu/bench_kernels: dev/bench_kernels.cu train_alexnet.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) $< -o $@ 2> build/gpu/bench_ptxas.log || { cat build/gpu/bench_ptxas.log; exit 1; }
else
bench-kernels-gpu:
	@echo "nvcc not found: skipped build/gpu/bench_kernels"
endif

gpu-check:
	bash dev/gpu_check.sh

# --- Python environment and tests ---------------------------------------------
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

test: venv all
	$(PY) -m pytest -q -m "not slow" tests

test-slow: venv all
	$(PY) -m pytest -q -m slow tests

test-asan: venv build/asan/libalexnet_cpu.so
	ALEXNET_LIB=build/asan/libalexnet_cpu.so \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 \
	$(PY) -m pytest -q -m "not slow and not no_asan" tests

demo: all
	./train_alexnet_cpu

clean:
	rm -rf build train_alexnet train_alexnet_cpu libalexnet.so libalexnet_cpu.so
