# AlexNet in one CUDA file.
#   make            CPU build (always) + GPU build (when nvcc is found)
#   make demo       the main job on the built-in default
#   make test       virtual environment + build + the test suite (CPU only)
#   make test-slow  the heavier tests
#   make test-asan  the test suite on an AddressSanitizer/UBSan CPU build
#   make bench      CPU-runtime benchmark (dev/bench_sgemm.cu)
#   make bench-kernels  the per-kernel benchmark (CPU build; GPU build when nvcc is found)
#   make dev-cuda   the kernel ladder dev/cuda/ (CPU build; GPU build when nvcc is found)
#   make gpu-check  dev/gpu_check.sh: build, test, sanitize, compare and benchmark on a GPU
#   make sass       dev/sass.py: registers, occupancy and instructions per slice of the matrix
#                   kernels, read from the compiled SASS (SASS_ARGS="--check --out FILE" ...)
#   make clean
# No step needs a GPU: nvcc compiles and links without one.

CXX      ?= g++
PYTHON   ?= python3
NVCC     ?= $(shell command -v nvcc 2>/dev/null)
GPU_ARCH ?= 70 80 90
# make test checks that the GPU build compiles and links, for one architecture
TEST_GPU_ARCH ?= 90
VENV     := .venv
PY       := $(VENV)/bin/python
JOBS     ?= $(shell nproc 2>/dev/null || echo 2)

# -Wno-unknown-pragmas: g++ ignores CUDA's `#pragma unroll`
CPU_FLAGS  := -std=c++17 -O2 -g -pthread -fPIC -Wall -Wextra -Wno-unused-parameter -Wno-unused-function -Wno-unknown-pragmas
ASAN_LINK  := -pthread -fsanitize=address,undefined
ASAN_FLAGS := -std=c++17 -O1 -g -fPIC $(ASAN_LINK) -fno-omit-frame-pointer -fno-sanitize-recover=undefined -Wno-unknown-pragmas
# Architectures this nvcc can build (nvcc 13 dropped sm_70); the others are skipped, loudly.
# An nvcc too old for --list-gpu-arch is trusted with all of GPU_ARCH.
NVCC_ARCHS := $(if $(NVCC),$(or $(shell $(NVCC) --list-gpu-arch 2>/dev/null | sed -n 's/^compute_//p'),$(GPU_ARCH)))
GPU_BUILT  := $(filter $(NVCC_ARCHS),$(GPU_ARCH))
GPU_SKIP   := $(filter-out $(NVCC_ARCHS),$(GPU_ARCH))
NVCC_FLAGS := -std=c++17 -O3 -lineinfo -Xptxas -v -Xcompiler -fPIC $(foreach a,$(GPU_BUILT),-gencode arch=compute_$(a),code=sm_$(a))
# alexnet_api.cu (the C API) includes train_alexnet.cu: one object per build holds both,
# and the executable and the shared library are linked from it.
SOURCES    := train_alexnet.cu alexnet_api.cu dev/cuda_cpu.h

.PHONY: FORCE test-build-gpu all cpu gpu demo test test-slow test-asan venv bench clean bench-kernels bench-kernels-cpu bench-kernels-gpu dev-cuda dev-cuda-gpu gpu-check test-build test-build-cpu sass
all: cpu gpu

# --- CPU build: the same .cu through g++ and the CUDA-on-CPU runtime ---------
cpu: train_alexnet_cpu libalexnet_cpu.so
	@echo "built CPU build: train_alexnet_cpu libalexnet_cpu.so"

build/cpu/train_alexnet.o: $(SOURCES)
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) -x c++ -c alexnet_api.cu -o $@

train_alexnet_cpu: build/cpu/train_alexnet.o
	$(CXX) -pthread $< -o $@

libalexnet_cpu.so: build/cpu/train_alexnet.o
	$(CXX) -pthread -shared $< -o $@

# The AddressSanitizer/UBSan build: library and executable from one object.
ASAN_BUILD := build/asan/libalexnet_cpu.so build/asan/train_alexnet_cpu
build/asan/train_alexnet.o: $(SOURCES)
	@mkdir -p $(@D)
	$(CXX) $(ASAN_FLAGS) -x c++ -c alexnet_api.cu -o $@

build/asan/libalexnet_cpu.so: build/asan/train_alexnet.o
	$(CXX) $(ASAN_LINK) -shared $< -o $@

build/asan/train_alexnet_cpu: build/asan/train_alexnet.o
	$(CXX) $(ASAN_LINK) $< -o $@

# --- the runtime's own test kernels and benchmark (CPU only) -------------------
RUNTIME_TESTS := build/libruntime_tests.so build/asan/libruntime_tests.so
build/libruntime_tests.so: dev/runtime_test_kernels.cu dev/cuda_cpu.h
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) -I. -x c++ -shared $< -o $@

build/asan/libruntime_tests.so: dev/runtime_test_kernels.cu dev/cuda_cpu.h
	@mkdir -p $(@D)
	$(CXX) $(ASAN_FLAGS) -I. -x c++ -shared $< -o $@

build/bench_sgemm: dev/bench_sgemm.cu dev/cuda_cpu.h
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) -I. -x c++ $< -o $@

bench: build/bench_sgemm
	./build/bench_sgemm

# --- GPU build: nvcc, sm_70/80/90 by default (make GPU_ARCH=90 for one) -------
ifneq ($(GPU_BUILT),)
gpu: train_alexnet libalexnet.so
	@echo "built GPU build with $(NVCC) for $(foreach a,$(GPU_BUILT),sm_$(a)): train_alexnet libalexnet.so (ptxas report: build/gpu/ptxas.log)"
	$(if $(GPU_SKIP),@echo "skipped $(foreach a,$(GPU_SKIP),sm_$(a)): not supported by this nvcc")

# build/gpu/arch holds the architectures of the last GPU build and changes only when they
# do: `make` after `make test` rebuilds for all of them.
build/gpu/arch: FORCE
	@mkdir -p $(@D)
	@echo "$(GPU_BUILT)" | cmp -s - $@ || echo "$(GPU_BUILT)" > $@

build/gpu/train_alexnet.o: alexnet_api.cu train_alexnet.cu build/gpu/arch
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@ 2> build/gpu/ptxas.log || { cat build/gpu/ptxas.log; exit 1; }

train_alexnet: build/gpu/train_alexnet.o
	$(NVCC) $(NVCC_FLAGS) $< -o $@

libalexnet.so: build/gpu/train_alexnet.o
	$(NVCC) $(NVCC_FLAGS) -shared $< -o $@
else
gpu:
	@echo "$(if $(NVCC),nvcc supports none of sm_$(GPU_ARCH),nvcc not found): skipped the GPU build (train_alexnet, libalexnet.so)"
endif

# --- per-kernel benchmark: dev/bench_kernels.cu includes train_alexnet.cu ------
bench-kernels: bench-kernels-cpu bench-kernels-gpu
bench-kernels-cpu: build/cpu/bench_kernels

build/cpu/bench_kernels: dev/bench_kernels.cu $(SOURCES)
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) -x c++ $< -o $@

ifneq ($(GPU_BUILT),)
bench-kernels-gpu: build/gpu/bench_kernels

build/gpu/bench_kernels: dev/bench_kernels.cu train_alexnet.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) $< -o $@ 2> build/gpu/bench_ptxas.log || { cat build/gpu/bench_ptxas.log; exit 1; }
else
bench-kernels-gpu:
	@echo "$(if $(NVCC),nvcc supports none of sm_$(GPU_ARCH),nvcc not found): skipped build/gpu/bench_kernels"
endif

# --- kernel ladder: dev/cuda/*.cu include train_alexnet.cu; the last version of each is its core ---
LADDER     := conv_forward fc_forward
LADDER_CPU := $(LADDER:%=build/cpu/dev_cuda/%)
dev-cuda: $(LADDER_CPU) dev-cuda-gpu

$(LADDER_CPU): build/cpu/dev_cuda/%: dev/cuda/%.cu dev/cuda/common.h $(SOURCES)
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) -x c++ $< -o $@

ifneq ($(GPU_BUILT),)
dev-cuda-gpu: $(LADDER:%=build/gpu/dev_cuda/%)

$(LADDER:%=build/gpu/dev_cuda/%): build/gpu/dev_cuda/%: dev/cuda/%.cu dev/cuda/common.h dev/tensor_core_ptx.cuh train_alexnet.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) $< -o $@ 2> $@.ptxas.log || { cat $@.ptxas.log; exit 1; }
else
dev-cuda-gpu:
	@echo "$(if $(NVCC),nvcc supports none of sm_$(GPU_ARCH),nvcc not found): skipped build/gpu/dev_cuda/*"
endif

gpu-check:
	bash dev/gpu_check.sh

# --- static SASS report: nvcc compiles, the pip wheels' cuobjdump and nvdisasm read ---
# libalexnet_cpu.so tells dev/sass.py the tile sizes (alexnet_gemm_*).
SASS_TOOLS := $(VENV)/.sass-tools
$(SASS_TOOLS): $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
	@touch $@

sass: $(SASS_TOOLS) libalexnet_cpu.so
	$(PY) dev/sass.py $(if $(NVCC),--nvcc $(NVCC)) $(SASS_ARGS)

# --- Python environment and tests ---------------------------------------------
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

# Everything the test suite runs, without the venv (dev/gpu_check.sh builds these; the
# GPU machine has no internet for a venv). The GPU build only has to compile and link here.
test-build-cpu: cpu $(RUNTIME_TESTS) build/cpu/bench_kernels $(LADDER_CPU)
test-build: test-build-cpu test-build-gpu
test-build-gpu:
	$(MAKE) gpu GPU_ARCH="$(TEST_GPU_ARCH)"

# The test builds are independent: one job per core.
test: venv
	$(MAKE) -j$(JOBS) test-build
	$(PY) -m pytest -q -m "not slow" tests

test-slow: venv all $(RUNTIME_TESTS)
	$(PY) -m pytest -q -m slow tests

test-asan: venv
	$(MAKE) -j$(JOBS) $(ASAN_BUILD) test-build
	ALEXNET_LIB=build/asan/libalexnet_cpu.so ALEXNET_EXE=build/asan/train_alexnet_cpu \
	RUNTIME_TESTS_LIB=build/asan/libruntime_tests.so \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 \
	$(PY) -m pytest -q -m "not slow and not no_asan" tests

# The demo needs the GPU build only where a GPU can run it.
demo: venv cpu $(if $(shell nvidia-smi -L 2>/dev/null),gpu)
	$(PY) alexnet.py demo

clean:
	rm -rf build train_alexnet train_alexnet_cpu libalexnet.so libalexnet_cpu.so
