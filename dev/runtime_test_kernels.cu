/*
Test kernels for the CUDA-on-CPU runtime (dev/cuda_cpu.h), built by the Makefile into
build/libruntime_tests.so (and an ASan/UBSan twin) and driven by tests/test_runtime.py.

Each entry point takes host arrays, runs one scenario and returns the CUDA error code
(0 = success); rt_last_error() gives the message of the last failure. After a failure
the devices are reset, so the sticky error does not leak into the next test.
*/
#ifdef __CUDACC__
#error "runtime_test_kernels.cu tests the CPU runtime: build it with g++ (make test)"
#endif
#include "dev/cuda_cpu.h"

#include <string>

static std::string last_message;

extern "C" const char* rt_last_error(void) { return last_message.c_str(); }

// Records the error of `e` (or of the last launch) and resets every device.
static int finish(cudaError_t e) {
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e == cudaSuccess) return 0;
    last_message = cudaGetErrorString(e);
    int device = 0, count = 0;
    cudaGetDevice(&device);
    cudaGetDeviceCount(&count);
    for (int d = 0; d < count; d++) {
        cudaSetDevice(d);
        cudaDeviceReset();
    }
    cudaSetDevice(device);
    return (int)e;
}

#define TRY(call) \
    do { cudaError_t e_ = (call); if (e_ != cudaSuccess) return finish(e_); } while (0)

// --- barriers ------------------------------------------------------------------------

// Sum of each 256-element chunk: tree reduction in shared memory. Correct only with the
// barriers: every step reads partial sums that other threads wrote in the step before.
__global__ void block_sum(const float* x, int n, int with_barrier, float* out) {
    SHARED(float, partial, [256]);
    int t = threadIdx.x, i = blockIdx.x * 256 + t;
    partial[t] = i < n ? x[i] : 0.0f;
    if (with_barrier) __syncthreads();
    for (int stride = 128; stride > 0; stride /= 2) {
        if (t < stride) partial[t] += partial[t + stride];
        if (with_barrier) __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

extern "C" int rt_block_sum(const float* x, int n, int with_barrier, float* out) {
    int blocks = (n + 255) / 256;
    float *dx, *dout;
    TRY(cudaMalloc(&dx, n * sizeof(float)));
    TRY(cudaMalloc(&dout, blocks * sizeof(float)));
    TRY(cudaMemcpy(dx, x, n * sizeof(float), cudaMemcpyHostToDevice));
    KERNEL_LAUNCH(block_sum, blocks, 256, 0, 0, dx, n, with_barrier, dout);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(out, dout, blocks * sizeof(float), cudaMemcpyDeviceToHost));
    cudaFree(dx);
    cudaFree(dout);
    return finish(cudaSuccess);
}

// out[c][r] = in[r][c] through a 32x33 shared tile (32x8 threads, 4 rows each): reads
// and writes are both along rows; the barrier separates the tile's writers from its readers.
__global__ void transpose(const float* in, int rows, int cols, int with_barrier, float* out) {
    SHARED(float, tile, [32][33]);
    int c = blockIdx.x * 32 + threadIdx.x;
    for (int k = 0; k < 32; k += 8) {
        int r = blockIdx.y * 32 + threadIdx.y + k;
        if (r < rows && c < cols) tile[threadIdx.y + k][threadIdx.x] = in[(size_t)r * cols + c];
    }
    if (with_barrier) __syncthreads();
    int r = blockIdx.y * 32 + threadIdx.x;
    for (int k = 0; k < 32; k += 8) {
        int oc = blockIdx.x * 32 + threadIdx.y + k;
        if (r < rows && oc < cols) out[(size_t)oc * rows + r] = tile[threadIdx.x][threadIdx.y + k];
    }
}

extern "C" int rt_transpose(const float* in, int rows, int cols, int with_barrier, float* out) {
    size_t bytes = (size_t)rows * cols * sizeof(float);
    float *din, *dout;
    TRY(cudaMalloc(&din, bytes));
    TRY(cudaMalloc(&dout, bytes));
    TRY(cudaMemcpy(din, in, bytes, cudaMemcpyHostToDevice));
    KERNEL_LAUNCH(transpose, dim3((cols + 31) / 32, (rows + 31) / 32), dim3(32, 8), 0, 0, din, rows, cols, with_barrier, dout);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(out, dout, bytes, cudaMemcpyDeviceToHost));
    cudaFree(din);
    cudaFree(dout);
    return finish(cudaSuccess);
}

// Barrier misuse, by scenario:
// 0: the two halves of the block wait at different __syncthreads() call sites
// 1: thread 3 returns while the others wait at the barrier
// 2: lanes 0-15 wait at __syncthreads() while lanes 16-31 wait at a shuffle with them: deadlock
// 3: lane 0 shuffles with a mask that leaves out its own lane
// 4: lane 5 returns while the others shuffle with it
// 5: lanes 0-15 shuffle among themselves, lanes 16-31 with the whole warp
__global__ void barrier_misuse(int scenario, float* out) {
    int t = threadIdx.x;
    float v = (float)t;
    if (scenario == 0) {
        if (t < 16) __syncthreads();
        else __syncthreads();
    } else if (scenario == 1) {
        if (t == 3) return;
        __syncthreads();
    } else if (scenario == 2) {
        if (t < 16) __syncthreads();
        else v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    } else if (scenario == 3) {
        v = __shfl_sync(t == 0 ? 0xFFFFFFFEu : 0xFFFFFFFFu, v, 0);
    } else if (scenario == 4) {
        if (t == 5) return;
        v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    } else {
        v = __shfl_xor_sync(t < 16 ? 0x0000FFFFu : 0xFFFFFFFFu, v, 1);
    }
    out[t] = v;
}

extern "C" int rt_barrier_misuse(int scenario) {
    float* d;
    TRY(cudaMalloc(&d, 32 * sizeof(float)));
    KERNEL_LAUNCH(barrier_misuse, 1, 32, 0, 0, scenario, d);
    return finish(cudaSuccess);
}

// __syncthreads_count/_and/_or of t % k == 0, then __syncthreads_count of t < k.
__global__ void barrier_votes(int k, int* out) {
    int t = threadIdx.x;
    int count = __syncthreads_count(t % k == 0);
    int all = __syncthreads_and(t % k == 0);
    int any = __syncthreads_or(t % k == 0);
    int below = __syncthreads_count(t < k);
    out[4 * t + 0] = count;
    out[4 * t + 1] = all;
    out[4 * t + 2] = any;
    out[4 * t + 3] = below;
}

extern "C" int rt_barrier_votes(int k, int threads, int* out) {
    int* d;
    TRY(cudaMalloc(&d, 4 * threads * sizeof(int)));
    KERNEL_LAUNCH(barrier_votes, 1, threads, 0, 0, k, d);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(out, d, 4 * threads * sizeof(int), cudaMemcpyDeviceToHost));
    cudaFree(d);
    return finish(cudaSuccess);
}

// --- warp operations --------------------------------------------------------------------

// One warp operation over a block: op 0-3 = __shfl_sync, _up, _down, _xor with the
// per-thread value and lane/delta/mask argument; op 4-6 = __ballot_sync, __any_sync,
// __all_sync of value != 0. Threads outside `active` (a mask per warp) skip the operation.
__global__ void warp_ops(int op, const unsigned* value, const int* arg, int width, unsigned active, unsigned* out) {
    int t = threadIdx.x, lane = t % 32;
    unsigned v = value[t], r = 0xDEADBEEFu;
    if (active >> lane & 1u) {
        switch (op) {
        case 0: r = __shfl_sync(active, v, arg[t], width); break;
        case 1: r = __shfl_up_sync(active, v, (unsigned)arg[t], width); break;
        case 2: r = __shfl_down_sync(active, v, (unsigned)arg[t], width); break;
        case 3: r = __shfl_xor_sync(active, v, arg[t], width); break;
        case 4: r = __ballot_sync(active, v != 0); break;
        case 5: r = (unsigned)__any_sync(active, v != 0); break;
        default: r = (unsigned)__all_sync(active, v != 0); break;
        }
    }
    out[t] = r;
}

extern "C" int rt_warp_op(int op, const unsigned* value, const int* arg, int width, unsigned active, int threads, unsigned* out) {
    unsigned *dv, *dout;
    int* darg;
    TRY(cudaMalloc(&dv, threads * sizeof(unsigned)));
    TRY(cudaMalloc(&darg, threads * sizeof(int)));
    TRY(cudaMalloc(&dout, threads * sizeof(unsigned)));
    TRY(cudaMemcpy(dv, value, threads * sizeof(unsigned), cudaMemcpyHostToDevice));
    TRY(cudaMemcpy(darg, arg, threads * sizeof(int), cudaMemcpyHostToDevice));
    KERNEL_LAUNCH(warp_ops, 1, threads, 0, 0, op, dv, darg, width, active, dout);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(out, dout, threads * sizeof(unsigned), cudaMemcpyDeviceToHost));
    cudaFree(dv);
    cudaFree(darg);
    cudaFree(dout);
    return finish(cudaSuccess);
}

// Warp sum of doubles (64-bit shuffles) followed by __syncwarp.
__global__ void warp_sum(const double* x, double* out) {
    double v = x[threadIdx.x];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
    __syncwarp();
    if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}

extern "C" int rt_warp_sum(const double* x, int threads, double* out) {
    double *dx, *dout;
    TRY(cudaMalloc(&dx, threads * sizeof(double)));
    TRY(cudaMalloc(&dout, threads / 32 * sizeof(double)));
    TRY(cudaMemcpy(dx, x, threads * sizeof(double), cudaMemcpyHostToDevice));
    KERNEL_LAUNCH(warp_sum, 1, threads, 0, 0, dx, dout);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(out, dout, threads / 32 * sizeof(double), cudaMemcpyDeviceToHost));
    return finish(cudaSuccess);
}

// --- memory -------------------------------------------------------------------------------

// Reads shared memory that no thread of the block wrote (the block before it on the same
// worker did) and device memory nobody wrote: all must be NaN. Counts threads with an
// integer atomicAdd.
__global__ void uninitialised(const float* fresh, float* out, int* count) {
    SHARED(float, tile, [64]);
    EXTERN_SHARED(float, dynamic);
    float* mine = out + 3 * (blockIdx.x * 64 + threadIdx.x);
    mine[0] = tile[threadIdx.x];
    mine[1] = dynamic[threadIdx.x];
    mine[2] = fresh[threadIdx.x];
    tile[threadIdx.x] = 1.0f;
    dynamic[threadIdx.x] = 1.0f;
    atomicAdd(count, 1);
}

extern "C" int rt_uninitialised(int blocks, float* out, int* count) {
    float *fresh, *dout;
    int* dcount;
    TRY(cudaMalloc(&fresh, 64 * sizeof(float)));
    TRY(cudaMalloc(&dout, 3 * 64 * blocks * sizeof(float)));
    TRY(cudaMalloc(&dcount, sizeof(int)));
    TRY(cudaMemset(dcount, 0, sizeof(int)));
    KERNEL_LAUNCH(uninitialised, blocks, 64, 64 * sizeof(float), 0, fresh, dout, dcount);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(out, dout, 3 * 64 * blocks * sizeof(float), cudaMemcpyDeviceToHost));
    TRY(cudaMemcpy(count, dcount, sizeof(int), cudaMemcpyDeviceToHost));
    return finish(cudaSuccess);
}

// Writes one element past the end of a cudaMalloc'd array (where = 0) or of a shared
// array (where = 1): ASan must report it.
__global__ void write_past_end(float* x, int n, int where) {
    SHARED(float, tile, [32]);
    SHARED(float, next, [32]);  // right after tile: the overrun must not land in it unseen
    next[threadIdx.x] = 0.0f;
    if (threadIdx.x == 0) {
        if (where == 0) x[n] = 1.0f;
        else (&tile[0])[n - 68] = 1.0f;  // n = 100: tile[32], through a pointer so that ASan, not UBSan, sees it
    }
}

extern "C" int rt_write_past_end(int where) {
    float* d;
    TRY(cudaMalloc(&d, 100 * sizeof(float)));
    KERNEL_LAUNCH(write_past_end, 1, 32, 0, 0, d, 100, where);
    return finish(cudaSuccess);
}

// A write far outside any allocation (kind 0), a stack overflow (1), __trap() (2):
// launch failures, not crashes.
__noinline__ __device__ float recurse(volatile float* deep, int n) {
    volatile float local[1024];
    local[n % 1024] = (float)n;
    return n > 0 ? recurse(local, n - 1) + local[n % 1024] : deep[0];
}

__global__ void fault(float* x, int kind) {
    if (threadIdx.x != 7 || blockIdx.x != 1) return;
    if (kind == 0) x[(size_t)1 << 40] = 1.0f;
    else if (kind == 1) x[0] = recurse(x, 1 << 20);
    else __trap();
}

extern "C" int rt_fault(int kind) {
    float* d;
    TRY(cudaMalloc(&d, sizeof(float)));
    KERNEL_LAUNCH(fault, 2, 32, 0, 0, d, kind);
    return finish(cudaSuccess);
}

// --- launch configuration -----------------------------------------------------------------

__global__ void empty_kernel() {}

__global__ void big_static_shared(float* out) {
    SHARED(float, a, [8192]);
    SHARED(float, b, [8192]);  // 64 KB in all: over the 48 KB limit
    a[threadIdx.x] = 1.0f;
    b[threadIdx.x] = 2.0f;
    out[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x];
}

struct Huge {
    float values[1100];  // 4400 bytes of kernel parameters: over the 4 KB limit
};
__global__ void huge_params(Huge h, float* out) { out[0] = h.values[0]; }

__global__ void opted_in_kernel() {
    EXTERN_SHARED(float, big);
    big[threadIdx.x] = 1.0f;
}

// kind 0: empty_kernel with the given grid/block/dynamic shared memory; 1: 64 KB of
// static shared memory; 2: 4400 bytes of parameters; 3: like 0 after opting in to
// 100 KB of dynamic shared memory.
extern "C" int rt_launch(int kind, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, size_t smem) {
    if (kind == 0) {
        KERNEL_LAUNCH(empty_kernel, dim3(gx, gy, gz), dim3(bx, by, bz), smem, 0);
        return finish(cudaSuccess);
    }
    if (kind == 3) {
        TRY(cudaFuncSetAttribute(opted_in_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
        KERNEL_LAUNCH(opted_in_kernel, dim3(gx, gy, gz), dim3(bx, by, bz), smem, 0);
        return finish(cudaSuccess);
    }
    float* d;
    TRY(cudaMalloc(&d, 1024 * sizeof(float)));
    if (kind == 1) {
        KERNEL_LAUNCH(big_static_shared, 1, 32, 0, 0, d);
    } else {
        Huge h{};
        KERNEL_LAUNCH(huge_params, 1, 1, 0, 0, h, d);
    }
    return finish(cudaSuccess);
}

// --- the device's description: attributes and occupancy ------------------------------------

// Attributes 1, 8, 10, 16, 39, 81, 82 of `device` into out[0..6].
extern "C" int rt_device_attributes(int device, int* out) {
    const cudaDeviceAttr attrs[] = {cudaDevAttrMaxThreadsPerBlock, cudaDevAttrMaxSharedMemoryPerBlock,
                                    cudaDevAttrWarpSize, cudaDevAttrMultiProcessorCount,
                                    cudaDevAttrMaxThreadsPerMultiProcessor,
                                    cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                    cudaDevAttrMaxRegistersPerMultiprocessor};
    for (int i = 0; i < 7; i++) TRY(cudaDeviceGetAttribute(&out[i], attrs[i], device));
    return 0;
}

// Resident blocks per SM of empty_kernel (kind 0) or opted_in_kernel (kind 1, 100 KB of
// dynamic shared memory allowed) with these block sizes and dynamic shared memory.
extern "C" int rt_occupancy(int kind, int block_size, size_t smem, int* blocks) {
    if (kind == 1) {
        TRY(cudaFuncSetAttribute(opted_in_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
        TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, opted_in_kernel, block_size, smem));
    } else {
        TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, empty_kernel, block_size, smem));
    }
    return 0;
}

// --- devices, streams, copies ---------------------------------------------------------------

__global__ void scale(float* x, int n, float factor) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= factor;
}

// x -> device 0 -> peer copy -> device 1, scaled there by 2 -> peer copy back to device
// 0 -> host. Also checks the peer-access calls.
extern "C" int rt_peer_copy(const float* x, int n, float* out) {
    int count = 0, can = 0;
    TRY(cudaGetDeviceCount(&count));
    if (count < 2) return finish(cudaErrorInvalidDevice);
    TRY(cudaDeviceCanAccessPeer(&can, 0, 1));
    if (!can) return finish(cudaErrorPeerAccessNotEnabled);
    float *d0, *d1;
    size_t bytes = n * sizeof(float);
    TRY(cudaSetDevice(0));
    TRY(cudaDeviceEnablePeerAccess(1, 0));
    if (cudaDeviceEnablePeerAccess(1, 0) != cudaErrorPeerAccessAlreadyEnabled) return finish(cudaErrorUnknown);
    cudaGetLastError();
    TRY(cudaMalloc(&d0, bytes));
    TRY(cudaMemcpy(d0, x, bytes, cudaMemcpyHostToDevice));
    TRY(cudaSetDevice(1));
    TRY(cudaMalloc(&d1, bytes));
    TRY(cudaMemcpyPeer(d1, 1, d0, 0, bytes));
    KERNEL_LAUNCH(scale, (n + 127) / 128, 128, 0, 0, d1, n, 2.0f);
    TRY(cudaGetLastError());
    cudaStream_t s;
    TRY(cudaStreamCreate(&s));
    TRY(cudaMemcpyPeerAsync(d0, 0, d1, 1, bytes, s));
    TRY(cudaStreamSynchronize(s));
    TRY(cudaStreamDestroy(s));
    TRY(cudaSetDevice(0));
    TRY(cudaMemcpy(out, d0, bytes, cudaMemcpyDeviceToHost));
    TRY(cudaDeviceDisablePeerAccess(1));
    cudaFree(d0);
    TRY(cudaSetDevice(1));
    cudaFree(d1);
    TRY(cudaSetDevice(0));
    return finish(cudaSuccess);
}

// Kernel arguments a GPU could not dereference. kind 0: a host stack array; 1: memory of
// device 0 in a kernel on device 1; 2: the same after enabling peer access (fine);
// 3: pinned host memory (fine). result gets x * 2 for the kinds that run.
extern "C" int rt_kernel_arguments(int kind, float* result) {
    float host[4] = {1, 2, 3, 4};
    float* p = host;
    TRY(cudaSetDevice(0));
    if (kind == 1 || kind == 2) {
        TRY(cudaMalloc(&p, sizeof(host)));
        TRY(cudaMemcpy(p, host, sizeof(host), cudaMemcpyHostToDevice));
        TRY(cudaSetDevice(1));
        if (kind == 2) TRY(cudaDeviceEnablePeerAccess(0, 0));
    } else if (kind == 3) {
        TRY(cudaMallocHost(&p, sizeof(host)));
        memcpy(p, host, sizeof(host));
    }
    KERNEL_LAUNCH(scale, 1, 4, 0, 0, p, 4, 2.0f);
    TRY(cudaGetLastError());
    TRY(cudaDeviceSynchronize());
    if (kind == 2) {
        TRY(cudaDeviceDisablePeerAccess(0));
        TRY(cudaSetDevice(0));
    }
    TRY(cudaMemcpy(result, p, sizeof(host), cudaMemcpyDefault));
    TRY(kind == 3 ? cudaFreeHost(p) : cudaFree(p));
    return finish(cudaSuccess);
}

// Copies that must fail: kind 0 a host pointer as the device side; 1 a copy past the end
// of an allocation; 2 a peer copy naming the wrong device; 3 cudaFree of a host pointer.
extern "C" int rt_bad_copy(int kind) {
    float host[64] = {};
    float* d;
    TRY(cudaMalloc(&d, 32 * sizeof(float)));
    cudaError_t e = cudaSuccess;
    if (kind == 0) e = cudaMemcpy(host, host + 32, 32 * sizeof(float), cudaMemcpyHostToDevice);
    else if (kind == 1) e = cudaMemcpy(d, host, 64 * sizeof(float), cudaMemcpyHostToDevice);
    else if (kind == 2) e = cudaMemcpyPeer(d, 1, d, 0, 32 * sizeof(float));
    else {
        float* heap = (float*)malloc(sizeof(float));
        e = cudaFree(heap);
        free(heap);
    }
    cudaFree(d);
    return finish(e);
}

// A producer kernel on stream a fills buf with i+1; a consumer on stream b doubles it
// into the pinned host buffer out. wait_event: b waits for a's event first; sync: the
// host synchronises b before returning. The copy back to the host goes to pinned memory,
// so it is asynchronous, as on a GPU.
__global__ void fill_index(float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = (float)(i + 1);
}

extern "C" int rt_stream_order(int n, int wait_event, int sync, float* result) {
    cudaStream_t a, b;
    cudaEvent_t produced;
    float *buf, *pinned;
    size_t bytes = n * sizeof(float);
    TRY(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
    TRY(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
    TRY(cudaEventCreateWithFlags(&produced, cudaEventDisableTiming));
    TRY(cudaMalloc(&buf, bytes));
    TRY(cudaMallocHost(&pinned, bytes));
    for (int i = 0; i < n; i++) pinned[i] = -1.0f;
    KERNEL_LAUNCH(fill_index, (n + 127) / 128, 128, 0, a, buf, n);
    TRY(cudaEventRecord(produced, a));
    if (wait_event) TRY(cudaStreamWaitEvent(b, produced, 0));
    KERNEL_LAUNCH(scale, (n + 127) / 128, 128, 0, b, buf, n, 2.0f);
    TRY(cudaMemcpyAsync(pinned, buf, bytes, cudaMemcpyDeviceToHost, b));
    if (sync) TRY(cudaStreamSynchronize(b));
    memcpy(result, pinned, bytes);  // what the host sees now
    TRY(cudaDeviceSynchronize());
    TRY(cudaFreeHost(pinned));
    TRY(cudaFree(buf));
    TRY(cudaEventDestroy(produced));
    TRY(cudaStreamDestroy(a));
    TRY(cudaStreamDestroy(b));
    return finish(cudaSuccess);
}

// Event timing and queries: two recorded events, elapsed time >= 0, and a sticky error
// that cudaDeviceReset clears.
extern "C" int rt_events(float* elapsed_ms) {
    cudaEvent_t start, stop;
    float* d;
    TRY(cudaEventCreate(&start));
    TRY(cudaEventCreate(&stop));
    TRY(cudaMalloc(&d, 1 << 20));
    TRY(cudaEventRecord(start));
    KERNEL_LAUNCH(fill_index, (1 << 18) / 256, 256, 0, 0, d, 1 << 18);
    TRY(cudaEventRecord(stop));
    TRY(cudaEventSynchronize(stop));
    TRY(cudaEventQuery(stop));
    TRY(cudaEventElapsedTime(elapsed_ms, start, stop));
    TRY(cudaEventDestroy(start));
    TRY(cudaEventDestroy(stop));
    TRY(cudaFree(d));
    return finish(cudaSuccess);
}

// --- tensor-core instructions -----------------------------------------------------------------

// One matrix product per warp, D = A B + C: kind 0 is mma_m16n8k8_tf32 (A 16x8, B 8x8,
// one 32-bit pattern per element), kind 1 is mma_m16n8k16_bf16 (A 16x16, B 16x8, one
// 16-bit pattern per element, in the low half of a word); A and B row-major, C and D
// 16x8 floats; warp w takes the w-th of each. Each lane loads its fragments with the
// formulas of the PTX ISA, written out here on their own, so a runtime that gave an
// element to another lane or register gives a wrong product.
__global__ void mma_kernel(int kind, const unsigned* a, const unsigned* b, const float* c, float* d) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int group = lane >> 2, tig = lane % 4;  // the ISA's groupID and threadID_in_group
    int K = kind == 0 ? 8 : 16;
    a += warp * 16 * K;
    b += warp * K * 8;
    c += warp * 16 * 8;
    d += warp * 16 * 8;
    unsigned fa[4], fb[2];
    if (kind == 0) {
        fa[0] = a[group * 8 + tig];            // a0: row groupID,     col threadID_in_group
        fa[1] = a[(group + 8) * 8 + tig];      // a1: row groupID + 8
        fa[2] = a[group * 8 + tig + 4];        // a2: col threadID_in_group + 4
        fa[3] = a[(group + 8) * 8 + tig + 4];  // a3
        fb[0] = b[tig * 8 + group];            // b0: row threadID_in_group, col groupID
        fb[1] = b[(tig + 4) * 8 + group];      // b1: row threadID_in_group + 4
    } else {
        // a_i: row groupID for i in {0, 1, 4, 5}, else groupID + 8; col 2 tig + (i & 1),
        // + 8 for i >= 4; register i / 2, a_(2j) in its low half
        for (int i = 0; i < 8; i++) {
            int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
            int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            unsigned v = a[row * 16 + col] & 0xFFFFu;
            fa[i / 2] = i % 2 == 0 ? v : fa[i / 2] | v << 16;
        }
        // b_i: row 2 tig + (i & 1), + 8 for i >= 2; col groupID
        for (int i = 0; i < 4; i++) {
            int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            unsigned v = b[row * 8 + group] & 0xFFFFu;
            fb[i / 2] = i % 2 == 0 ? v : fb[i / 2] | v << 16;
        }
    }
    float fc[4], fd[4];
    for (int i = 0; i < 4; i++) fc[i] = c[(group + (i >= 2 ? 8 : 0)) * 8 + tig * 2 + (i & 1)];  // c0, c1: row groupID
    if (kind == 0) mma_m16n8k8_tf32(fd, fa, fb, fc);
    else mma_m16n8k16_bf16(fd, fa, fb, fc);
    for (int i = 0; i < 4; i++) d[(group + (i >= 2 ? 8 : 0)) * 8 + tig * 2 + (i & 1)] = fd[i];
}

extern "C" int rt_mma(int kind, int warps, const unsigned* a, const unsigned* b, const float* c, float* d) {
    int K = kind == 0 ? 8 : 16;
    size_t na = (size_t)warps * 16 * K, nb = (size_t)warps * K * 8, nc = (size_t)warps * 16 * 8;
    unsigned *da, *db;
    float *dc, *dd;
    TRY(cudaMalloc(&da, na * sizeof(unsigned)));
    TRY(cudaMalloc(&db, nb * sizeof(unsigned)));
    TRY(cudaMalloc(&dc, nc * sizeof(float)));
    TRY(cudaMalloc(&dd, nc * sizeof(float)));
    TRY(cudaMemcpy(da, a, na * sizeof(unsigned), cudaMemcpyHostToDevice));
    TRY(cudaMemcpy(db, b, nb * sizeof(unsigned), cudaMemcpyHostToDevice));
    TRY(cudaMemcpy(dc, c, nc * sizeof(float), cudaMemcpyHostToDevice));
    KERNEL_LAUNCH(mma_kernel, 1, 32 * warps, 0, 0, kind, da, db, dc, dd);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(d, dd, nc * sizeof(float), cudaMemcpyDeviceToHost));
    cudaFree(da);
    cudaFree(db);
    cudaFree(dc);
    cudaFree(dd);
    return finish(cudaSuccess);
}

// kind 0: out[i] = cvt_rna_tf32(x[i]); kind 1: out[i] = pack_bf16x2(x[2i], x[2i + 1]).
__global__ void convert_kernel(int kind, const float* x, int n, unsigned* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = kind == 0 ? cvt_rna_tf32(x[i]) : pack_bf16x2(x[2 * i], x[2 * i + 1]);
}

extern "C" int rt_convert(int kind, const float* x, int n, unsigned* out) {
    size_t nx = (size_t)n * (kind == 0 ? 1 : 2);
    float* dx;
    unsigned* dout;
    TRY(cudaMalloc(&dx, nx * sizeof(float)));
    TRY(cudaMalloc(&dout, n * sizeof(unsigned)));
    TRY(cudaMemcpy(dx, x, nx * sizeof(float), cudaMemcpyHostToDevice));
    KERNEL_LAUNCH(convert_kernel, (n + 127) / 128, 128, 0, 0, kind, dx, n, dout);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(out, dout, n * sizeof(unsigned), cudaMemcpyDeviceToHost));
    cudaFree(dx);
    cudaFree(dout);
    return finish(cudaSuccess);
}

// `count` (2 or 4) 8x8 matrices of 16-bit values, mats[matrix][row][col], go to a padded
// shared tile whose 48-byte rows hold a matrix row 16 bytes in, and not in order: row r
// of matrix m lives in tile row (5 (8m + r) + 3) % 32. Each lane reads its registers with
// ldmatrix (got) and, for comparison, element by element as the PTX ISA places them (direct).
__global__ void ldmatrix_kernel(int count, int trans, const unsigned short* mats, unsigned* got, unsigned* direct) {
    SHARED(uint4, tile, [32 * 3]);  // 32 rows of 24 16-bit values; uint4: 16-byte aligned rows
    unsigned short* t = reinterpret_cast<unsigned short*>(tile);
    auto slot = [](int matrix, int row) { return (5 * (8 * matrix + row) + 3) % 32; };
    auto at = [&](int matrix, int row, int col) -> unsigned short& { return t[slot(matrix, row) * 24 + 8 + col]; };
    int lane = threadIdx.x;
    if (lane < 8 * count)
        for (int col = 0; col < 8; col++) at(lane / 8, lane % 8, col) = mats[lane * 8 + col];
    __syncthreads();
    unsigned r[4];
    const void* row = &at(lane / 8 % count, lane % 8, 0);  // lanes past 8 count: any valid row
    if (count == 4) {
        if (trans) ldmatrix_x4_trans(r, row);
        else ldmatrix_x4(r, row);
    } else {
        if (trans) ldmatrix_x2_trans(r, row);
        else ldmatrix_x2(r, row);
    }
    for (int m = 0; m < count; m++) {
        int i = lane / 4, j = 2 * (lane % 4);  // row lane / 4, columns 2 (lane % 4), + 1
        unsigned lo = trans ? at(m, j, i) : at(m, i, j);
        unsigned hi = trans ? at(m, j + 1, i) : at(m, i, j + 1);
        got[lane * count + m] = r[m];
        direct[lane * count + m] = lo | hi << 16;
    }
}

extern "C" int rt_ldmatrix(int count, int trans, const unsigned short* mats, unsigned* got, unsigned* direct) {
    unsigned short* dm;
    unsigned *dgot, *ddirect;
    TRY(cudaMalloc(&dm, count * 64 * sizeof(unsigned short)));
    TRY(cudaMalloc(&dgot, 32 * count * sizeof(unsigned)));
    TRY(cudaMalloc(&ddirect, 32 * count * sizeof(unsigned)));
    TRY(cudaMemcpy(dm, mats, count * 64 * sizeof(unsigned short), cudaMemcpyHostToDevice));
    KERNEL_LAUNCH(ldmatrix_kernel, 1, 32, 0, 0, count, trans, dm, dgot, ddirect);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(got, dgot, 32 * count * sizeof(unsigned), cudaMemcpyDeviceToHost));
    TRY(cudaMemcpy(direct, ddirect, 32 * count * sizeof(unsigned), cudaMemcpyDeviceToHost));
    cudaFree(dm);
    cudaFree(dgot);
    cudaFree(ddirect);
    return finish(cudaSuccess);
}

// cp.async by 64 threads, each copying its own 16 bytes of a stage (x[256 s + 4t ..]) into
// stage s of a shared buffer and reading its own part back into out[snapshot][t][0..3]:
// 0: stage 0, commit, wait_all, read                                 -> snapshot 0
// 1: stage 0, commit, read before any wait (snapshot 0), wait_all
// 2: stage 0, commit, stage 1, commit, wait<1>, read both (snapshots 0 and 1),
//    wait<0>, read stage 1 (snapshot 2)
// 3: stage 0 without a commit, wait<0>, read (snapshot 0), wait_all, read (snapshot 1)
__global__ void cp_async_kernel(int scenario, const float* x, float* out) {
    SHARED(uint4, stages, [2][64]);
    int t = threadIdx.x;
    auto issue = [&](int s) { cp_async_16(&stages[s][t], &x[256 * s + 4 * t]); };
    auto read = [&](int snapshot, int s) { memcpy(&out[(snapshot * 64 + t) * 4], &stages[s][t], 16); };
    if (scenario == 0) {
        issue(0);
        cp_async_commit();
        cp_async_wait_all();
        read(0, 0);
    } else if (scenario == 1) {
        issue(0);
        cp_async_commit();
        read(0, 0);
        cp_async_wait_all();
    } else if (scenario == 2) {
        issue(0);
        cp_async_commit();
        issue(1);
        cp_async_commit();
        cp_async_wait<1>();
        read(0, 0);
        read(1, 1);
        cp_async_wait<0>();
        read(2, 1);
    } else {
        issue(0);
        cp_async_wait<0>();
        read(0, 0);
        cp_async_wait_all();
        read(1, 0);
    }
}

extern "C" int rt_cp_async(int scenario, const float* x, float* out) {
    float *dx, *dout;
    TRY(cudaMalloc(&dx, 512 * sizeof(float)));
    TRY(cudaMalloc(&dout, 3 * 256 * sizeof(float)));
    TRY(cudaMemcpy(dx, x, 512 * sizeof(float), cudaMemcpyHostToDevice));
    TRY(cudaMemset(dout, 0, 3 * 256 * sizeof(float)));
    KERNEL_LAUNCH(cp_async_kernel, 1, 64, 0, 0, scenario, dx, dout);
    TRY(cudaGetLastError());
    TRY(cudaMemcpy(out, dout, 3 * 256 * sizeof(float), cudaMemcpyDeviceToHost));
    cudaFree(dx);
    cudaFree(dout);
    return finish(cudaSuccess);
}

// Misuse of the tensor-core instructions, by scenario:
// 0: mma in a block of 16 threads (a partial warp)
// 1: lanes 16-31 return while lanes 0-15 wait at mma
// 2: ldmatrix with a row address 2 bytes past 16-byte alignment
// 3: ldmatrix with an address in global memory
// 4: cp_async_16 to a misaligned shared destination
// 5: cp_async_16 to global memory
__global__ void tensor_misuse(int scenario, float* g) {
    SHARED(uint4, tile, [64]);
    int lane = threadIdx.x;
    unsigned a[4] = {}, b[2] = {}, r[4];
    float c[4] = {}, d[4];
    char* shared_row = reinterpret_cast<char*>(&tile[lane * 2]);
    if (scenario == 0) {
        mma_m16n8k8_tf32(d, a, b, c);
    } else if (scenario == 1) {
        if (lane >= 16) return;
        mma_m16n8k8_tf32(d, a, b, c);
    } else if (scenario == 2) {
        ldmatrix_x4(r, shared_row + 2);
    } else if (scenario == 3) {
        ldmatrix_x4(r, g + lane * 4);
    } else if (scenario == 4) {
        cp_async_16(shared_row + 8, g);
    } else if (scenario == 5) {
        cp_async_16(g + 4 * lane, g);
    } else if (lane < 16) {  // half the warp at one matrix operation, half at another
        ldmatrix_x4(r, shared_row);
    } else {
        mma_m16n8k8_tf32(d, a, b, c);
    }
    g[lane] = d[0] + (float)r[0];
}

extern "C" int rt_tensor_misuse(int scenario) {
    float* d;
    TRY(cudaMalloc(&d, 256 * sizeof(float)));
    KERNEL_LAUNCH(tensor_misuse, 1, scenario == 0 ? 16 : 32, 0, 0, scenario, d);
    return finish(cudaSuccess);
}
