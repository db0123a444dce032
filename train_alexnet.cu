/*
AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) in one CUDA file.

Every kernel is written here by hand, the way cuda-convnet was: no cuDNN, no cuBLAS.
The file reads top to bottom in the order data flows through the network:

  0. CUDA or the CUDA-on-CPU runtime, error checking, device buffers
  1. counter-based random numbers (Philox), shared with alexnet.py
  2. data augmentation: uint8 HWC images -> float NCHW crops
  3. convolution  4. ReLU  5. local response normalisation  6. max pooling
  7. fully connected  8. dropout  9. softmax + cross-entropy  10. SGD
  11. the two-tower model  12. data loader  13. training loop and checkpoints
  14. C API (used by alexnet.py and the tests)  15. main

Conventions: activations are float32 NCHW; conv weights [K][C/groups][R][S] and
fc weights [out][in], as in PyTorch. Gradients are of the batch-mean loss.

Build: `make`. nvcc builds the GPU executable; g++ builds the same file against
dev/cuda_cpu.h, a small CUDA runtime that runs every kernel on the CPU.
*/
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdexcept>
#include <string>

// ----------------------------------------------------------------------------
// 0. CUDA or the CUDA-on-CPU runtime, error checking, device buffers

#ifdef __CUDACC__
#include <cuda_runtime.h>
// g++ cannot parse <<<...>>>, __shared__ arrays need per-block storage on the CPU:
// these three macros are the only places where the two builds differ.
#define SHARED(T, name, dims) __shared__ T name dims
#define EXTERN_SHARED(T, name) extern __shared__ T name[]
#define KERNEL_LAUNCH(kernel, grid, block, smem, stream, ...) \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#else
#include "dev/cuda_cpu.h"
#endif

// Every failure becomes an AlexNetError: main() prints it as one line and exits
// non-zero; the C API turns it into an error code and alexnet_last_error().
struct AlexNetError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] static void fail(const char* fmt, ...) {
    char msg[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(msg, sizeof(msg), fmt, args);
    va_end(args);
    throw AlexNetError(msg);
}

#define require(cond, ...) \
    do { if (!(cond)) fail(__VA_ARGS__); } while (0)

static void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) fail("CUDA error at %s:%d: %s", file, line, cudaGetErrorString(err));
}
#define cudaCheck(call) cuda_check((call), __FILE__, __LINE__)

// Launch a kernel and check the launch.
#define LAUNCH(kernel, grid, block, smem, stream, ...)                  \
    do {                                                              \
        KERNEL_LAUNCH(kernel, grid, block, smem, stream, __VA_ARGS__); \
        cudaCheck(cudaGetLastError());                                \
    } while (0)

static inline int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

// A device array that frees itself; optionally filled from / copied to the host.
template <typename T>
struct DeviceArray {
    T* ptr = nullptr;
    size_t count = 0;
    explicit DeviceArray(size_t n) : count(n) { cudaCheck(cudaMalloc((void**)&ptr, bytes())); }
    DeviceArray(const T* host, size_t n) : DeviceArray(n) {
        require(host != nullptr || n == 0, "null input pointer");
        cudaCheck(cudaMemcpy(ptr, host, bytes(), cudaMemcpyHostToDevice));
    }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    ~DeviceArray() { cudaFree(ptr); }
    size_t bytes() const { return count * sizeof(T); }
    void download(T* host) const {
        require(host != nullptr || count == 0, "null output pointer");
        cudaCheck(cudaMemcpy(host, ptr, bytes(), cudaMemcpyDeviceToHost));
    }
};

// ----------------------------------------------------------------------------
// 1. Counter-based random numbers (Philox4x32-10)

// ----------------------------------------------------------------------------
// 2. Data augmentation

// ----------------------------------------------------------------------------
// 3. Convolution

// ----------------------------------------------------------------------------
// 4. ReLU

// ----------------------------------------------------------------------------
// 5. Local response normalisation (across channels)

// ----------------------------------------------------------------------------
// 6. Max pooling

// ----------------------------------------------------------------------------
// 7. Fully connected

// ----------------------------------------------------------------------------
// 8. Dropout

// ----------------------------------------------------------------------------
// 9. Softmax and cross-entropy

// ----------------------------------------------------------------------------
// 10. SGD with momentum and weight decay

// ----------------------------------------------------------------------------
// 11. The two-tower model

// ----------------------------------------------------------------------------
// 12. Data loader

// ----------------------------------------------------------------------------
// 13. Training loop and checkpoints

// ----------------------------------------------------------------------------
// 14. C API: every op with host arrays in and out, for alexnet.py and the tests.
// Each entry point returns 0 on success, or 1 with the reason in alexnet_last_error().

static thread_local std::string last_error;

extern "C" const char* alexnet_last_error(void) { return last_error.c_str(); }

template <typename Body>
static int api_call(Body&& body) {
    try {
        body();
        return 0;
    } catch (const std::exception& e) {
        last_error = e.what();
        return 1;
    }
}

// --- 14a. C API: convolution and fully connected

// --- 14b. C API: the other layers

// ----------------------------------------------------------------------------
// 15. main

#ifndef ALEXNET_NO_MAIN  // dev/bench_kernels.cu includes this file and brings its own main
int main(int argc, char** argv) {
    try {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) fail("no CUDA device found; use ./train_alexnet_cpu");
        printf("train_alexnet: %d device(s); training arrives with the model\n", count);
        return 0;
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
#endif
