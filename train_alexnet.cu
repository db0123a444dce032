/*
AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) in one CUDA file.

Every kernel is written here by hand, the way cuda-convnet was: no vendor libraries.
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
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <algorithm>
#include <future>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

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

// ALEXNET_SYNC_LAUNCHES=1: wait for every kernel and check it, so that a fault names
// the kernel that caused it instead of surfacing at some later call.
static bool sync_launches() {
    static const bool on = [] {
        const char* v = getenv("ALEXNET_SYNC_LAUNCHES");
        return v && *v && strcmp(v, "0") != 0;
    }();
    return on;
}

static void launch_check(const char* kernel, const char* file, int line) {
    cuda_check(cudaGetLastError(), file, line);
    if (!sync_launches()) return;
    cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess)
        fail("CUDA error in kernel %s launched at %s:%d: %s", kernel, file, line,
             cudaGetErrorString(err));
}

// Launch a kernel and check the launch.
#define LAUNCH(kernel, grid, block, smem, stream, ...)                  \
    do {                                                              \
        KERNEL_LAUNCH(kernel, grid, block, smem, stream, __VA_ARGS__); \
        launch_check(#kernel, __FILE__, __LINE__);                    \
    } while (0)

// Full unrolling of a loop with a constant trip count, so that small arrays indexed by
// its counter live in registers (nvcc's pragma; g++ needs its own spelling).
#ifdef __CUDACC__
#define UNROLL _Pragma("unroll")
#else
#define UNROLL _Pragma("GCC unroll 16")
#endif

// The tensor-core instructions (sm_80 and later) that the matrix products use with
// --precision tf32 / bf16, one function per PTX instruction. The CPU build gets the same
// functions from dev/cuda_cpu.h, emulated lane by lane with the PTX ISA's fragment
// layouts. mma and ldmatrix are asm volatile, being warp-synchronous (never dropped or
// duplicated); ldmatrix reads shared memory behind the compiler's back, hence "memory".
#ifdef __CUDACC__
__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const unsigned a[4], const unsigned b[2],
                                                 const float c[4]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2],
                                                  const float c[4]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row))
                 : "memory");
}

// Conversions are plain asm: the compiler may schedule them like arithmetic.
__device__ __forceinline__ unsigned cvt_rna_tf32(float x) {  // to nearest, ties away
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {  // to nearest even;
    unsigned r;                                                         // hi is the first source
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif

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

// Milliseconds that `work` takes on `stream`, between two CUDA events (for benchmarks).
template <typename Work>
static float elapsed_ms(cudaStream_t stream, Work&& work) {
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    cudaCheck(cudaEventRecord(start, stream));
    work();
    cudaCheck(cudaEventRecord(stop, stream));
    cudaCheck(cudaEventSynchronize(stop));
    float ms = 0.0f;
    cudaCheck(cudaEventElapsedTime(&ms, start, stop));
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return ms;
}

// ----------------------------------------------------------------------------
// 1. Counter-based random numbers (Philox4x32-10)
//
// Dropout needs a mask that the backward pass can regenerate and that alexnet.py can
// reproduce bit for bit, so it comes from a counter-based generator instead of a state:
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// exactly as in Random123 (its known-answer vectors are in tests/test_layers.py).
// A round maps counter (c0, c1, c2, c3) and key (k0, k1) to
//   (hi(M1*c2) ^ c1 ^ k0,  lo(M1*c2),  hi(M0*c0) ^ c3 ^ k1,  lo(M0*c0)),
// with 32x32->64-bit products; the key is bumped by (W0, W1) before rounds 2..10.
// A word x becomes a float in [0, 1) as (x >> 8) * 2^-24, exact in float32.

struct Philox4 {
    uint32_t word[4];
};

__host__ __device__ __forceinline__ Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2,
                                                       uint32_t c3, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        uint64_t p0 = (uint64_t)0xD2511F53u * c0;
        uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0;
        c1 = (uint32_t)p1;
        c2 = n2;
        c3 = (uint32_t)p0;
    }
    return Philox4{{c0, c1, c2, c3}};
}

__host__ __device__ __forceinline__ float philox_uniform(uint32_t word) {
    return (float)(word >> 8) * 0x1p-24f;
}

// ----------------------------------------------------------------------------
// 2. Data augmentation
//
// out[n][c][y][x] = (img[n][oy+y][ox+x'][c] - mean[my][mx][c] + light[n][c]) / divisor
//   x' = flip ? crop-1-x : x,   light[n][c] = sum_i alphas[n][i] * eigval[i] * eigvec[c][i]
// (PCA lighting, paper section 4.1; eigvec row-major, column i is eigenvector i).
// The paper's mean is the mean image under the crop, (my, mx) = (oy+y, ox+x'); the 2012
// code subtracts the mean image's centre crop at the output pixel, unmirrored:
// (my, mx) = ((H-crop)/2 + y, (W-crop)/2 + x) (centre_mean). The 2012 code's lighting
// passes sqrt(eigval) as `eigval` and divides by 1.1 (doc/alexnet-2012-code.md, note 4).
// One thread per output pixel (n, y, x) doing its three channels: consecutive threads
// read consecutive pixels of an image row and write consecutive floats of each plane.
// The offsets must keep the crop inside the image (the C API checks them on the host).
__global__ void augment_images_kernel(float* __restrict__ out, const uint8_t* __restrict__ images,
                                      const float* __restrict__ mean, const int* __restrict__ offsets,
                                      const uint8_t* __restrict__ flips, const float* __restrict__ alphas,
                                      const float* __restrict__ eigval, const float* __restrict__ eigvec,
                                      int N, int H, int W, int crop, bool centre_mean, float divisor) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * crop * crop) return;
    int x = t % crop, y = t / crop % crop, n = t / (crop * crop);
    int sy = offsets[2 * n] + y;
    int sx = offsets[2 * n + 1] + (flips[n] ? crop - 1 - x : x);
    long pixel = ((long)sy * W + sx) * 3;
    long mean_pixel = centre_mean ? ((long)((H - crop) / 2 + y) * W + (W - crop) / 2 + x) * 3 : pixel;
    const uint8_t* img = images + (long)n * H * W * 3;
    for (int c = 0; c < 3; c++) {
        float light = 0.0f;
        for (int i = 0; i < 3; i++) light += alphas[3 * n + i] * eigval[i] * eigvec[3 * c + i];
        out[((long)(n * 3 + c) * crop + y) * crop + x] =
            (((float)img[pixel + c] - mean[mean_pixel + c]) + light) / divisor;
    }
}

static long augment_images_check(int N, int H, int W, int crop, float divisor) {
    require(N > 0 && H > 0 && W > 0 && crop > 0, "augment_images: sizes must be positive (N=%d H=%d W=%d crop=%d)", N, H, W, crop);
    require(crop <= H && crop <= W, "augment_images: crop %d is larger than the %dx%d image", crop, H, W);
    require((long)N * H * W * 3 <= INT32_MAX, "augment_images: batch too large");
    require(divisor > 0 && isfinite(divisor), "augment_images: the divisor must be positive and finite (got %g)",
            divisor);
    return (long)N * 3 * crop * crop;
}

void augment_images(float* out, const uint8_t* images, const float* mean, const int* offsets,
                    const uint8_t* flips, const float* alphas, const float* eigval, const float* eigvec,
                    int N, int H, int W, int crop, bool centre_mean, float divisor, cudaStream_t stream) {
    augment_images_check(N, H, W, crop, divisor);
    const int threads = 256;
    LAUNCH(augment_images_kernel, ceil_div((long)N * crop * crop, threads), threads, 0, stream,
           out, images, mean, offsets, flips, alphas, eigval, eigvec, N, H, W, crop, centre_mean, divisor);
}

// ----------------------------------------------------------------------------
// 3. Convolution

// All convolution and fully connected work is one tiled matrix product
//     C[m][n] = sum_k A[m][k] * B[k][n]
// in which A and B are never materialised: a "problem" struct says where element
// (m, k) of A and (k, n) of B live in the tensors (implicit GEMM), and how C is
// stored (bias, ReLU, layout). One core serves all of them: gemm_kernel in FP32 on the
// CUDA cores, or, with --precision tf32 / bf16, mma_gemm_kernel on the tensor cores,
// which shares its gathers, step tables, split-K and stores:
//
//   problem                  rows m        columns n        reduction k
//   conv_forward             out channel   (image, oy, ox)  (in channel, r, s)
//   conv_backward_data       in channel    (image, y, x)    (out channel, r, s)
//   conv_backward_weights    out channel   (in channel,r,s) (image, oy, ox)
//   fc_forward               image         out feature      in feature
//   fc_backward_data         image         in feature       out feature
//   fc_backward_weights      out feature   in feature       image
//
// Gathers without division. Every operand element sits at
//     data[origin(mn).offset + step(k).offset]
// and reads as 0 unless y = origin(mn).y + step(k).y and x = origin(mn).x + step(k).x
// fall inside a height x width box (this is how padding, image borders and strided
// taps are expressed). A thread's row or column mn is fixed for the whole reduction, so
// its origin is computed once, divisions and all, before the loop. The steps of a
// slice's k are the same for every thread: GEMM_TILE_K threads per operand write them
// to a small table in shared memory, walking k as mixed-radix digits
//     k = (d0 * radix1 + d1) * radix2 + d2,
//     step(k) = (d0*stride0 + d1*stride1 + d2*stride2,  d1*step_y,  d2*step_x),
// which advance by GEMM_TILE_K per slice with carries, not divisions. In the loop a
// load is then one table read, three adds (offset, y, x), a box test (two unsigned
// compares) and the load itself. Plain strided
// operands (weights, fc activations: one digit, no box) need no table at all.

constexpr int GEMM_TILE_K = 16;        // reduction slice
constexpr int GEMM_PARTS = 4;          // the next slice is fetched in this many parts
constexpr int GEMM_MICRO = 8;          // each thread computes 8x8 outputs
constexpr int GEMM_PAD = 4;            // row padding: rows stay 16-byte aligned for the
                                       // float4 reads
constexpr int GEMM_OUTSIDE = -(1 << 29);  // a y that no box contains (rows/k out of range);
                                          // two of them still add up without overflow
constexpr int GEMM_MAX_SPLITS = 64;
constexpr int GEMM_MIN_SPLIT_DEPTH = 128;  // keeps each split's loop long

// How one operand is gathered (see above). Contiguous operands (weights, fc
// activations) use one digit: radix1 = radix2 = 1, offset k * stride0, no box.
struct GemmGather {
    const float* data;
    int radix1 = 1, radix2 = 1;
    int stride0 = 1, stride1 = 0, stride2 = 0;
    int step_y = 0, step_x = 0;
    int height = INT_MAX, width = INT_MAX;
    int carry0 = 0, carry1 = 0, carry2 = 0;  // GEMM_TILE_K in these digits (gemm_launch)
};

// Where row or column mn of an operand starts: see GemmGather.
struct GemmOrigin {
    int offset, y, x;
};

// Sizes of one GEMM (of each batch) and how its reduction is split.
struct GemmDims {
    int rows, cols, depth;  // C is rows x cols, summed over depth
    int batches;            // independent GEMMs of these sizes (conv groups, stride phases)
    int splits = 1;         // the reduction is cut into ranges of depth_per_split
    int depth_per_split = 0;
};

// A block of THREADS computes a TILE_M x TILE_N tile of C.
template <int TILE_M, int TILE_N>
struct GemmTile {
    static constexpr int THREADS = TILE_M * TILE_N / (GEMM_MICRO * GEMM_MICRO);
    // Blocks per SM that the registers must allow: 256-thread tiles get up to 128 registers
    // a thread (16 warps per SM), 128-thread tiles, which stage more values per thread,
    // up to 168 (12 warps).
    static constexpr int MIN_BLOCKS = THREADS >= 256 ? 2 : 3;
    static constexpr size_t SHARED_BYTES =  // two step tables and two tiles per operand
        2 * 2 * GEMM_TILE_K * sizeof(int4)
        + 2 * GEMM_TILE_K * (TILE_M + TILE_N + 2 * GEMM_PAD) * sizeof(float);
};

// Which element of a TILE x GEMM_TILE_K slice thread `tid` loads as its i-th (i < LOADS).
// Every thread keeps a single row/column mn. When consecutive k are adjacent in memory
// (K_CONTIGUOUS), a thread takes LOADS consecutive k and neighbouring threads the rest of
// the row, else neighbouring threads take neighbouring mn: either way a warp reads whole
// 32-byte sectors.
template <int TILE, int THREADS, bool K_CONTIGUOUS>
struct GemmWalk {
    static constexpr int LOADS = TILE * GEMM_TILE_K / THREADS;
    static constexpr int PER_ROW = GEMM_TILE_K / LOADS;  // threads that share a row (K_CONTIGUOUS)
    static_assert(K_CONTIGUOUS ? GEMM_TILE_K % LOADS == 0 : THREADS % TILE == 0, "tile shape");
    static __device__ __forceinline__ int mn(int tid) {
        return K_CONTIGUOUS ? tid / PER_ROW : tid % TILE;
    }
    static __device__ __forceinline__ int k(int tid, int i) {
        return K_CONTIGUOUS ? tid % PER_ROW * LOADS + i : tid / TILE + i * (THREADS / TILE);
    }
};

// The element at origin o + step of `data` (g.data, or the same tensor stored in another
// type), or 0 outside the box. Inside it the offset is non-negative, so it indexes as an
// unsigned 32-bit number: one add and one widening multiply-add make the address.
template <typename T>
__device__ __forceinline__ T gemm_load(const T* data, const GemmGather& g, GemmOrigin o, int4 step) {
    bool inside = ((unsigned)(o.y + step.y) < (unsigned)g.height) & ((unsigned)(o.x + step.z) < (unsigned)g.width);
    return inside ? data[(unsigned)(o.offset + step.x)] : T(0);
}

// A plain strided operand (one digit, no box) needs no table: element k of the row at
// origin o is data[o.offset + k * stride0], or 0 past the split's end.
template <typename T>
__device__ __forceinline__ T gemm_load_strided(const T* data, const GemmGather& g, GemmOrigin o, int k, int k_end) {
    return k < k_end ? data[(unsigned)(o.offset + k * g.stride0)] : T(0);
}

// The k of one step-table entry as digits, advanced slice by slice without division.
struct GemmDigits {
    int d0, d1, d2;
    __device__ void start(const GemmGather& g, int k) {  // before the loop: divisions allowed
        d2 = k % g.radix2;
        d1 = k / g.radix2 % g.radix1;
        d0 = k / g.radix2 / g.radix1;
    }
    __device__ int4 step(const GemmGather& g, bool inside) const {
        if (!inside) return make_int4(0, GEMM_OUTSIDE, 0, 0);
        return make_int4(d0 * g.stride0 + d1 * g.stride1 + d2 * g.stride2, d1 * g.step_y,
                         d2 * g.step_x, 0);
    }
    __device__ void advance(const GemmGather& g) {  // k += GEMM_TILE_K
        d2 += g.carry2;
        if (d2 >= g.radix2) d2 -= g.radix2, d1++;
        d1 += g.carry1;
        if (d1 >= g.radix1) d1 -= g.radix1, d0++;
        d0 += g.carry0;
    }
};

// What one block of a product works on (either kernel): its GEMM's constants (batch), its
// split's range of k cut into slices of slice_k, and the origins of row m of A and
// column n of B, the ones this thread loads. Rows and columns past the edge read as 0
// (table operands) or as row 0 (strided operands): either way they only reach outputs
// that are never stored.
template <typename Problem>
struct GemmBlock {
    decltype(std::declval<const Problem&>().batch(0)) batch;
    int k_begin, k_end, slices;
    GemmOrigin a_origin, b_origin;
    __device__ GemmBlock(const Problem& p, int slice_k, int m, int n) {
        const GemmDims& d = p.dims;
        batch = p.batch(blockIdx.z % d.batches);
        k_begin = blockIdx.z / d.batches * d.depth_per_split;
        k_end = k_begin + d.depth_per_split < d.depth ? k_begin + d.depth_per_split : d.depth;
        slices = (k_end - k_begin + slice_k - 1) / slice_k;
        a_origin = m < d.rows ? p.a_origin(batch, m) : GemmOrigin{0, GEMM_OUTSIDE, 0};
        b_origin = n < d.cols ? p.b_origin(batch, n) : GemmOrigin{0, GEMM_OUTSIDE, 0};
    }
};

// The pipeline of both kernels, over the slices of one split: slice s is multiplied from
// shared buffer s % 2 while slice s+1 is gathered into registers and stored to the other,
// in PARTS parts (each part fetched before a part of the multiply and stored after it, so
// that few values wait in registers); the step tables run one slice further ahead. One
// barrier per slice. The callbacks: write_steps(s, buf) writes slice s's step table into
// table buffer buf, fetch(s, buf, part) loads a part of slice s into registers using
// table buf, stash(buf, part) stores the registers into tile buffer buf, multiply(buf,
// part) multiplies a part of the slice in tile buffer buf.
template <int PARTS, typename WriteSteps, typename Fetch, typename Stash, typename Multiply>
__device__ __forceinline__ void gemm_pipeline(int slices, WriteSteps&& write_steps, Fetch&& fetch, Stash&& stash,
                                              Multiply&& multiply) {
    write_steps(0, 0);
    __syncthreads();
    UNROLL for (int part = 0; part < PARTS; part++) {
        fetch(0, 0, part);
        stash(0, part);
    }
    write_steps(1, 1);
    __syncthreads();
    auto slice = [&](int s, int buf) {
        const bool more = s + 1 < slices;
        UNROLL for (int part = 0; part < PARTS; part++) {
            if (more) fetch(s + 1, buf ^ 1, part);
            if (part == 0) write_steps(s + 2, buf);  // the table slice s was fetched from
            multiply(buf, part);
            if (more) stash(buf ^ 1, part);  // the tiles slice s-1 was multiplied from
        }
        __syncthreads();
    };
    for (int s = 0; s < slices; s += 2) {  // two at a time: constant buffer addresses
        slice(s, 0);
        if (s + 1 < slices) slice(s + 1, 1);
    }
}

// A Problem provides: GemmDims dims; GemmGather a, b; the flags a_k_contiguous and
// b_k_contiguous (the walk each operand's loads take) and a_strided and b_strided (the
// operand is a plain strided matrix: no step table); batch(z), the constants of GEMM
// z < dims.batches that a block computes once (the conv group, say); a_origin(batch, m)
// and b_origin(batch, n) for in-range m, n; and store(batch, m, n, value), which writes
// the finished C[m][n] (adding the bias, say).
//
// Thread mapping: block (blockIdx.x, blockIdx.y) computes the TILE_M x TILE_N tile of C
// at rows blockIdx.y*TILE_M, columns blockIdx.x*TILE_N; blockIdx.z = split*batches + batch.
// Thread tid = ty * TILE_N/8 + tx holds 8x8 outputs in registers: rows ty*4 + {0..3}
// and TILE_M/2 + ty*4 + {0..3}, columns likewise from tx. Per k it reads them as four
// 128-bit shared loads (two quads of A's column, two of B's row) for 64 FFMA, and the
// quads of a warp's threads are consecutive (no bank conflicts).
// Pipeline (gemm_pipeline): while the block multiplies the slice in shared buffer s % 2,
// each thread gathers its part of slice s+1 in GEMM_PARTS parts, each loaded into
// registers before a quarter of the slice's 1024 FFMA and stored to the other buffer
// after them (global latency hidden behind the math). The sum over k runs in k order within each split; splits
// write partial tiles to `partial` ([split][batch][rows][cols]), which
// gemm_split_sum_kernel adds in split order: the same bits on every run.
template <int TILE_M, int TILE_N, typename Problem>
__global__ void __launch_bounds__(GemmTile<TILE_M, TILE_N>::THREADS,
                                  GemmTile<TILE_M, TILE_N>::MIN_BLOCKS)
gemm_kernel(Problem p, float* partial) {
    constexpr int K = GEMM_TILE_K, THREADS = GemmTile<TILE_M, TILE_N>::THREADS;
    using WalkA = GemmWalk<TILE_M, THREADS, Problem::a_k_contiguous>;
    using WalkB = GemmWalk<TILE_N, THREADS, Problem::b_k_contiguous>;
    EXTERN_SHARED(float4, smem);  // GemmTile::SHARED_BYTES, in 16-byte units:
    constexpr int A_TILE = 4 * K, B_TILE = A_TILE + K * (TILE_M + GEMM_PAD) / 2;
    auto a_steps = reinterpret_cast<int4(*)[K]>(smem);                                 // [2][K]
    auto b_steps = reinterpret_cast<int4(*)[K]>(smem + 2 * K);                         // [2][K]
    auto a_tile = reinterpret_cast<float(*)[K][TILE_M + GEMM_PAD]>(smem + A_TILE);  // [2][K][.]
    auto b_tile = reinterpret_cast<float(*)[K][TILE_N + GEMM_PAD]>(smem + B_TILE);  // [2][K][.]

    const GemmDims d = p.dims;
    const int tid = threadIdx.x, tx = tid % (TILE_N / 8), ty = tid / (TILE_N / 8);
    const GemmBlock<Problem> block(p, K, blockIdx.y * TILE_M + WalkA::mn(tid), blockIdx.x * TILE_N + WalkB::mn(tid));
    const auto& batch = block.batch;
    const int k_begin = block.k_begin, k_end = block.k_end, slices = block.slices;
    const GemmOrigin a_origin = block.a_origin, b_origin = block.b_origin;

    // Lanes 0..K-1 of warp 0 write A's step table, those of warp 1 B's (table operands).
    const int lane = tid % 32, warp = tid / 32;
    const bool writes_a = !Problem::a_strided && warp == 0 && lane < K;
    const bool writes_b = !Problem::b_strided && warp == 1 && lane < K;
    GemmDigits digits;
    if (writes_a) digits.start(p.a, k_begin + lane);
    if (writes_b) digits.start(p.b, k_begin + lane);
    auto write_steps = [&](int s, int buf) {  // the table of slice s, into buffer buf = s % 2
        bool inside = k_begin + s * K + lane < k_end;
        if (writes_a && s < slices) {
            a_steps[buf][lane] = digits.step(p.a, inside);
            digits.advance(p.a);
        }
        if (writes_b && s < slices) {
            b_steps[buf][lane] = digits.step(p.b, inside);
            digits.advance(p.b);
        }
    };

    // The next slice comes in GEMM_PARTS parts, each fetched while a part of the current
    // slice is multiplied, so that few values wait in registers.
    constexpr int PART_A = WalkA::LOADS / GEMM_PARTS, PART_B = WalkB::LOADS / GEMM_PARTS;
    float a_next[PART_A], b_next[PART_B];
    auto fetch = [&](int s, int buf, int part) {  // part of slice s into registers
        UNROLL for (int i = 0; i < PART_A; i++) {
            int k = WalkA::k(tid, part * PART_A + i);
            if constexpr (Problem::a_strided)
                a_next[i] = gemm_load_strided(p.a.data, p.a, a_origin, k_begin + s * K + k, k_end);
            else
                a_next[i] = gemm_load(p.a.data, p.a, a_origin, a_steps[buf][k]);
        }
        UNROLL for (int i = 0; i < PART_B; i++) {
            int k = WalkB::k(tid, part * PART_B + i);
            if constexpr (Problem::b_strided)
                b_next[i] = gemm_load_strided(p.b.data, p.b, b_origin, k_begin + s * K + k, k_end);
            else
                b_next[i] = gemm_load(p.b.data, p.b, b_origin, b_steps[buf][k]);
        }
    };
    auto stash = [&](int buf, int part) {  // the registers into tile buffer buf
        UNROLL for (int i = 0; i < PART_A; i++)
            a_tile[buf][WalkA::k(tid, part * PART_A + i)][WalkA::mn(tid)] = a_next[i];
        UNROLL for (int i = 0; i < PART_B; i++)
            b_tile[buf][WalkB::k(tid, part * PART_B + i)][WalkB::mn(tid)] = b_next[i];
    };
    float acc[GEMM_MICRO][GEMM_MICRO] = {};
    auto multiply = [&](int buf, int part) {  // acc += part of the slice in buffer buf
        constexpr int STEPS = K / GEMM_PARTS;
        UNROLL for (int kk = part * STEPS; kk < (part + 1) * STEPS; kk++) {
            const float* a_row = a_tile[buf][kk];
            const float* b_row = b_tile[buf][kk];
            float4 a_lo = *reinterpret_cast<const float4*>(a_row + ty * 4);
            float4 a_hi = *reinterpret_cast<const float4*>(a_row + TILE_M / 2 + ty * 4);
            float4 b_lo = *reinterpret_cast<const float4*>(b_row + tx * 4);
            float4 b_hi = *reinterpret_cast<const float4*>(b_row + TILE_N / 2 + tx * 4);
            const float a[GEMM_MICRO] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
            const float b[GEMM_MICRO] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
            UNROLL for (int i = 0; i < GEMM_MICRO; i++)
                UNROLL for (int j = 0; j < GEMM_MICRO; j++) acc[i][j] += a[i] * b[j];
        }
    };

    gemm_pipeline<GEMM_PARTS>(slices, write_steps, fetch, stash, multiply);

    UNROLL for (int i = 0; i < GEMM_MICRO; i++) {
        int row = blockIdx.y * TILE_M + (i / 4) * (TILE_M / 2) + ty * 4 + i % 4;
        if (row >= d.rows) continue;
        UNROLL for (int j = 0; j < GEMM_MICRO; j++) {
            int col = blockIdx.x * TILE_N + (j / 4) * (TILE_N / 2) + tx * 4 + j % 4;
            if (col >= d.cols) continue;
            if (d.splits == 1) p.store(batch, row, col, acc[i][j]);
            else partial[((long)blockIdx.z * d.rows + row) * d.cols + col] = acc[i][j];
        }
    }
}

// C[m][n] of a split product: the splits' partial results added in split order, then
// stored by the problem. Thread i handles element i = (batch, m, n) (coalesced reads).
template <typename Problem>
__global__ void gemm_split_sum_kernel(Problem p, const float* partial) {
    const GemmDims d = p.dims;
    long per_split = (long)d.batches * d.rows * d.cols;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= per_split) return;
    float sum = 0.0f;
    for (int s = 0; s < d.splits; s++) sum += partial[s * per_split + i];
    int col = (int)(i % d.cols), row = (int)(i / d.cols % d.rows), z = (int)(i / d.cols / d.rows);
    p.store(p.batch(z), row, col, sum);
}

// --- the same products on tensor cores (--precision tf32, bf16)
// mma.sync multiplies, per warp, a 16 x 8 tile of A by an 8 x 8 tile of B and adds the
// 16 x 8 product into FP32 accumulators. Its operands are 32-bit registers holding one
// TF32 value (m16n8k8 .tf32) or two BF16 values (m16n8k16 .bf16): counted in 32-bit
// words along k the two shapes are the same, so one kernel serves both, and a format
// struct says how values are packed into a word and which mma consumes it. Rounding to
// the format happens once, when a thread packs its gathered values (TF32: to nearest,
// ties away from zero, as cvt.rna; BF16: to nearest even); products of rounded values
// are exact in FP32 and the sums are FP32, so only the inputs lose precision.
struct MmaTf32 {
    static constexpr int PER_WORD = 1;
    static __device__ __forceinline__ unsigned pack(const float (&x)[1]) { return cvt_rna_tf32(x[0]); }
    static __device__ __forceinline__ void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        mma_m16n8k8_tf32(acc, a, b, acc);
    }
};
struct MmaBf16 {  // the lower k in the low half of a word
    static constexpr int PER_WORD = 2;
    static __device__ __forceinline__ unsigned pack(const float (&x)[2]) { return pack_bf16x2(x[0], x[1]); }
    static __device__ __forceinline__ void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        mma_m16n8k16_bf16(acc, a, b, acc);
    }
};

// A block of 8 warps computes a TILE_M x TILE_N tile of C (128x128, or 64x128, 32x128,
// 128x64 for products with few rows or columns), the warps in a 2 x 4 grid: warp w the
// (TILE_M/2) x (TILE_N/4) at rows (w / 4) TILE_M/2, columns (w % 4) TILE_N/4, in mma tiles
// of 16 x 8 (128x128: 4 x 4 of them, 64 accumulators per lane). A slice is GEMM_TILE_K =
// 16 words of k (16 TF32 or 32 BF16 values): two mma steps of 8 words. GemmWalk deals the
// slice's words out to the threads as it deals gemm_kernel's floats.
constexpr int MMA_THREADS = 256;
// Row pitch of the shared tiles in words: the 8 rows of 16 bytes that one ldmatrix
// matrix reads start at banks 20r mod 32 = 0, 20, 8, 28, 16, 4, 24, 12 and cover all 32
// banks once (no conflicts), and rows stay 16-byte aligned as ldmatrix requires.
constexpr int MMA_PITCH = GEMM_TILE_K + 4;

// One word of an operand's slice: the PER_WORD values from k on (k counted from the
// slice's start k0), gathered and packed. (The dev/cuda ladder overloads it for operands stored in
// BF16, to measure that alternative.)
template <typename Format, bool STRIDED>
__device__ __forceinline__ unsigned mma_word(const GemmGather& g, GemmOrigin origin, const int4* steps, int k, int k0,
                                             int k_end) {
    float x[Format::PER_WORD];
    UNROLL for (int e = 0; e < Format::PER_WORD; e++) {
        if constexpr (STRIDED) x[e] = gemm_load_strided(g.data, g, origin, k0 + k + e, k_end);
        else x[e] = gemm_load(g.data, g, origin, steps[k + e]);
    }
    return Format::pack(x);
}

// This thread's words of one part of an operand's next slice: word i holds the values from
// k = PER_WORD * Walk::k(part * PART + i) of the slice that starts at k0.
template <typename Format, typename Walk, bool STRIDED, int PART, typename Gather>
__device__ __forceinline__ void mma_fetch(unsigned (&next)[PART], int part, const Gather& g, GemmOrigin origin,
                                          const int4* steps, int k0, int k_end) {
    UNROLL for (int i = 0; i < PART; i++)
        next[i] = mma_word<Format, STRIDED>(g, origin, steps, Walk::k(threadIdx.x, part * PART + i) * Format::PER_WORD,
                                            k0, k_end);
}

// gemm_kernel's product on tensor cores: same problems, gathers, step tables, splits
// and partial tiles; only the tiles and the multiply differ.
//
// Shared tiles are k-contiguous for both operands, a_tile[m][word] and b_tile[n][word]
// (B transposed: the "col" of mma's row.col), double-buffered.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k8 / m16n8k16"), lane = 4g + t; in
// words, so for BF16 "word t" is the pair k = 2t, 2t+1:
//
//          A, 16 x 8 words              B, 8 words x 8 columns        C, 16 x 8 floats
//          word t      word t+4         row = word; col g             cols 2t, 2t+1
//   row g     a[0]        a[2]          word t:    b[0]          row g:     c[0] c[1]
//   row g+8   a[1]        a[3]          word t+4:  b[1]          row g+8:   c[2] c[3]
//
// ldmatrix (m8n8 .b16) gives lane l, from each 8x8 matrix of 16-bit values, row l/4 and
// columns 2(l%4), 2(l%4)+1: in words, row g and word t, the (g, t) of every fragment
// above once the tiles are k-contiguous. So A's four registers are one ldmatrix.x4 of the
// matrices (rows 0-7, words 0-3), (rows 8-15, words 0-3), (rows 0-7, words 4-7), (rows
// 8-15, words 4-7), lane l passing the address of row l % 16, word 4 (l / 16); and one
// ldmatrix.x4 gives b[0], b[1] of two neighbouring 8-column tiles, lane l passing column
// (l % 8) + 8 (l / 16), word 4 ((l / 8) % 2). (.trans, which would read a k-major tile,
// transposes 16-bit elements and would split a TF32 word: B is stored transposed
// instead.) Per mma step a warp issues 4 + 2 ldmatrix.x4 for 16 mma.
//
// Pipeline (gemm_pipeline): each thread gathers its words of slice s+1 in two parts, each
// loaded into registers before one of the slice's two mma steps and stored to the other
// buffer after it (half the words wait in registers at a time). The step tables are
// written by lanes 0..SLICE_K-1 of warp 0 (A) and of warp 1 (B).
// Two blocks per SM (16 warps): at most 128 registers a thread, which the two-part
// fetch keeps every variant within without spills (sm_90, nvcc 13).
template <typename Format, int TILE_M, int TILE_N, typename Problem>
__global__ void __launch_bounds__(MMA_THREADS, 2) mma_gemm_kernel(Problem p, float* partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // no tf32/bf16 mma before sm_80: gemm_launch refuses such devices
#else
    constexpr int SLICE_K = GEMM_TILE_K * Format::PER_WORD;  // values of k per slice
    using WalkA = GemmWalk<TILE_M, MMA_THREADS, Problem::a_k_contiguous>;
    using WalkB = GemmWalk<TILE_N, MMA_THREADS, Problem::b_k_contiguous>;
    SHARED(uint4, a_raw, [2][TILE_M][MMA_PITCH / 4]);  // uint4: 16-byte aligned rows
    SHARED(uint4, b_raw, [2][TILE_N][MMA_PITCH / 4]);
    SHARED(int4, a_steps, [2][SLICE_K]);
    SHARED(int4, b_steps, [2][SLICE_K]);
    auto a_tile = reinterpret_cast<unsigned(*)[TILE_M][MMA_PITCH]>(a_raw);
    auto b_tile = reinterpret_cast<unsigned(*)[TILE_N][MMA_PITCH]>(b_raw);

    const GemmDims d = p.dims;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const GemmBlock<Problem> block(p, SLICE_K, blockIdx.y * TILE_M + WalkA::mn(tid), blockIdx.x * TILE_N + WalkB::mn(tid));
    const auto& batch = block.batch;
    const int k_begin = block.k_begin, k_end = block.k_end, slices = block.slices;
    const GemmOrigin a_origin = block.a_origin, b_origin = block.b_origin;

    // Entry k of slice s's table is step(k_begin + s * SLICE_K + k): a slice is PER_WORD
    // of GemmDigits' advances.
    const bool writes_a = !Problem::a_strided && warp == 0 && lane < SLICE_K;
    const bool writes_b = !Problem::b_strided && warp == 1 && lane < SLICE_K;
    GemmDigits digits{0, 0, 0};
    if (writes_a) digits.start(p.a, k_begin + lane);
    if (writes_b) digits.start(p.b, k_begin + lane);
    auto write_steps = [&](int s, int buf) {
        if (!(writes_a || writes_b) || s >= slices) return;
        const GemmGather& g = writes_a ? p.a : p.b;
        (writes_a ? a_steps : b_steps)[buf][lane] = digits.step(g, k_begin + s * SLICE_K + lane < k_end);
        UNROLL for (int e = 0; e < Format::PER_WORD; e++) digits.advance(g);
    };

    constexpr int STEPS = GEMM_TILE_K / 8, PART_A = WalkA::LOADS / STEPS, PART_B = WalkB::LOADS / STEPS;
    unsigned a_next[PART_A], b_next[PART_B];
    auto fetch = [&](int s, int buf, int part) {  // part of slice s into registers, from step table buf
        const int k0 = k_begin + s * SLICE_K;
        mma_fetch<Format, WalkA, Problem::a_strided>(a_next, part, p.a, a_origin, a_steps[buf], k0, k_end);
        mma_fetch<Format, WalkB, Problem::b_strided>(b_next, part, p.b, b_origin, b_steps[buf], k0, k_end);
    };
    auto stash = [&](int buf, int part) {  // the registers into tile buffer buf
        UNROLL for (int i = 0; i < PART_A; i++)
            a_tile[buf][WalkA::mn(tid)][WalkA::k(tid, part * PART_A + i)] = a_next[i];
        UNROLL for (int i = 0; i < PART_B; i++)
            b_tile[buf][WalkB::mn(tid)][WalkB::k(tid, part * PART_B + i)] = b_next[i];
    };

    constexpr int WARP_M = TILE_M / 2, WARP_N = TILE_N / 4, TILES_M = WARP_M / 16, TILES_N = WARP_N / 8;
    static_assert(TILES_M >= 1 && TILES_N % 2 == 0, "warp tiles of 16 x 16 or more (B's ldmatrix.x4 takes two)");
    const int warp_m = warp / 4 * WARP_M, warp_n = warp % 4 * WARP_N;
    float acc[TILES_M][TILES_N][4] = {};
    auto multiply = [&](int buf, int step) {  // mma step `step`: words 8 step .. 8 step + 7
        const int w0 = 8 * step;
        unsigned a[TILES_M][4], b[TILES_N][2];
        UNROLL for (int i = 0; i < TILES_M; i++)
            ldmatrix_x4(a[i], &a_tile[buf][warp_m + 16 * i + lane % 16][w0 + 4 * (lane / 16)]);
        UNROLL for (int j = 0; j < TILES_N; j += 2) {
            unsigned pair[4];  // b[0], b[1] of column tiles j and j+1
            ldmatrix_x4(pair, &b_tile[buf][warp_n + 8 * j + lane % 8 + 8 * (lane / 16)][w0 + 4 * (lane / 8 % 2)]);
            b[j][0] = pair[0], b[j][1] = pair[1], b[j + 1][0] = pair[2], b[j + 1][1] = pair[3];
        }
        UNROLL for (int i = 0; i < TILES_M; i++)
            UNROLL for (int j = 0; j < TILES_N; j++) Format::mma(acc[i][j], a[i], b[j]);
    };

    gemm_pipeline<STEPS>(slices, write_steps, fetch, stash, multiply);

    const int g = lane / 4, t = lane % 4;
    UNROLL for (int i = 0; i < TILES_M; i++)
        UNROLL for (int j = 0; j < TILES_N; j++)
            UNROLL for (int r = 0; r < 4; r++) {
                const int row = blockIdx.y * TILE_M + warp_m + 16 * i + g + 8 * (r / 2);
                const int col = blockIdx.x * TILE_N + warp_n + 8 * j + 2 * t + r % 2;
                if (row >= d.rows || col >= d.cols) continue;
                if (d.splits == 1) p.store(batch, row, col, acc[i][j][r]);
                else partial[((long)blockIdx.z * d.rows + row) * d.cols + col] = acc[i][j][r];
            }
#endif
}

// --- choosing the kernel, the tile and the split from the device
// The precision picks the kernel: gemm_kernel (FP32) or mma_gemm_kernel (TF32, BF16).
// Tiles are 128x128, unless a product with few rows (or columns) wastes over a quarter
// less on padding with 64x128 (or 128x64); mma_gemm_kernel then also takes 32x128 if that
// wastes over a quarter less again.
// Then the reduction is split when the tiles alone would leave SMs idle: among
// 1..GEMM_MAX_SPLITS splits, each at least GEMM_MIN_SPLIT_DEPTH deep and within the
// workspace, the fewest that fill the waves of resident blocks (SMs x blocks per SM, from
// the occupancy calculator) to 90%, else the best filling. The CPU runtime answers both
// queries for an H100 (132 SMs), so the choices made there are those of an H100.

// The arithmetic of the matrix products (--precision): FP32 on the CUDA cores (the
// paper's), or tensor cores on operands rounded to TF32 or BF16, accumulating in FP32.
enum Precision { FP32, TF32, BF16 };
constexpr int NUM_PRECISIONS = 3;
static const char* const PRECISION_NAMES[NUM_PRECISIONS] = {"fp32", "tf32", "bf16"};

struct Workspace {  // device floats that split products may use for partial results
    float* ptr = nullptr;
    size_t floats = 0;
};

struct GemmPlan {
    int tile_m, tile_n;
    GemmDims dims;
    long tiles, slots;  // tiles per split; blocks the GPU holds at once
};

template <typename Kernel>
static int blocks_per_sm(Kernel kernel, int threads, size_t shared_bytes) {
    int blocks = 0;
    cudaCheck(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared_bytes));
    return std::max(blocks, 1);
}

// mma_gemm_kernel in the tile of a plan (all take 8 warps and static shared memory).
template <typename Format, typename Problem>
static auto mma_gemm_tile_kernel(int tile_m, int tile_n) {
    return tile_m == 64   ? mma_gemm_kernel<Format, 64, 128, Problem>
           : tile_m == 32 ? mma_gemm_kernel<Format, 32, 128, Problem>
           : tile_n == 64 ? mma_gemm_kernel<Format, 128, 64, Problem>
                          : mma_gemm_kernel<Format, 128, 128, Problem>;
}

template <typename Problem>
static int gemm_blocks_per_sm(Precision precision, int tile_m, int tile_n) {
    if (precision == TF32) return blocks_per_sm(mma_gemm_tile_kernel<MmaTf32, Problem>(tile_m, tile_n), MMA_THREADS, 0);
    if (precision == BF16) return blocks_per_sm(mma_gemm_tile_kernel<MmaBf16, Problem>(tile_m, tile_n), MMA_THREADS, 0);
    if (tile_m == 64) return blocks_per_sm(gemm_kernel<64, 128, Problem>, GemmTile<64, 128>::THREADS,
                                           GemmTile<64, 128>::SHARED_BYTES);
    if (tile_n == 64) return blocks_per_sm(gemm_kernel<128, 64, Problem>, GemmTile<128, 64>::THREADS,
                                           GemmTile<128, 64>::SHARED_BYTES);
    return blocks_per_sm(gemm_kernel<128, 128, Problem>, GemmTile<128, 128>::THREADS,
                         GemmTile<128, 128>::SHARED_BYTES);
}

static long gemm_tiles(const GemmDims& d, int tile_m, int tile_n) {
    return (long)ceil_div(d.rows, tile_m) * ceil_div(d.cols, tile_n) * d.batches;
}

// workspace_floats < 0: as many as the best split wants (to size a workspace).
template <typename Problem>
static GemmPlan gemm_plan(const Problem& p, long workspace_floats, Precision precision) {
    GemmPlan plan{128, 128, p.dims, 0, 0};
    GemmDims& d = plan.dims;
    long big = gemm_tiles(d, 128, 128) * 4;  // areas in 64x64 units
    long wide = gemm_tiles(d, 64, 128) * 2, tall = gemm_tiles(d, 128, 64) * 2;
    if (4 * std::min(wide, tall) < 3 * big) {
        if (wide <= tall) plan.tile_m = 64;
        else plan.tile_n = 64;
    }
    if (precision != FP32 && plan.tile_m == 64 && 4 * gemm_tiles(d, 32, 128) < 3 * gemm_tiles(d, 64, 128) * 2)
        plan.tile_m = 32;
    int device = 0, sms = 0;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int per_sm = gemm_blocks_per_sm<Problem>(precision, plan.tile_m, plan.tile_n);
    const long slots = (long)sms * per_sm, tiles = gemm_tiles(d, plan.tile_m, plan.tile_n);
    plan.tiles = tiles, plan.slots = slots;
    long per_split = (long)d.batches * d.rows * d.cols;
    int most = std::min(GEMM_MAX_SPLITS, std::max(1, d.depth / GEMM_MIN_SPLIT_DEPTH));
    if (workspace_floats >= 0) most = std::min<long>(most, std::max(1L, workspace_floats / per_split));
    int best = 1;
    double best_fill = 0.0;
    for (int s = 1; s <= most; s++) {
        long blocks = tiles * s;
        double fill = (double)blocks / ((double)ceil_div(blocks, slots) * slots);
        if (fill > best_fill) best = s, best_fill = fill;
        if (fill >= 0.9) break;
    }
    const int slice_k = GEMM_TILE_K * (precision == BF16 ? 2 : 1);  // values of k per slice
    int slices = ceil_div(d.depth, slice_k);
    int slices_per_split = ceil_div(slices, best);
    d.splits = ceil_div(slices, slices_per_split);  // no split left with an empty range
    d.depth_per_split = slices_per_split * slice_k;
    return plan;
}

// Floats of workspace that gemm_launch may use for this product, in any precision.
template <typename Problem>
static size_t gemm_workspace(const Problem& p) {
    size_t most = 0;
    for (int precision = 0; precision < NUM_PRECISIONS; precision++) {
        GemmDims d = gemm_plan(p, -1, (Precision)precision).dims;
        if (d.splits > 1) most = std::max(most, (size_t)d.splits * d.batches * d.rows * d.cols);
    }
    return most;
}

static void gemm_carries(GemmGather& g) {  // GEMM_TILE_K as digits of radix1, radix2
    g.carry2 = GEMM_TILE_K % g.radix2;
    g.carry1 = GEMM_TILE_K / g.radix2 % g.radix1;
    g.carry0 = GEMM_TILE_K / g.radix2 / g.radix1;
}

static void gemm_check_grid(const GemmDims& d, int tile_m) {
    require(ceil_div(d.rows, tile_m) <= 65535 && (long)d.batches * d.splits <= 65535,
            "gemm: grid too large (%d rows, %d batches x splits)", d.rows, d.batches * d.splits);
}

template <int TILE_M, int TILE_N, typename Problem>
static void gemm_launch_tiles(const Problem& p, float* partial, cudaStream_t stream) {
    const GemmDims& d = p.dims;
    gemm_check_grid(d, TILE_M);
    dim3 grid(ceil_div(d.cols, TILE_N), ceil_div(d.rows, TILE_M), d.batches * d.splits);
    LAUNCH((gemm_kernel<TILE_M, TILE_N, Problem>), grid, (GemmTile<TILE_M, TILE_N>::THREADS),
           (GemmTile<TILE_M, TILE_N>::SHARED_BYTES), stream, p, partial);
}

template <typename Format, typename Problem>
static void mma_gemm_launch_tiles(const Problem& p, int tile_m, int tile_n, float* partial, cudaStream_t stream) {
    const GemmDims& d = p.dims;
    gemm_check_grid(d, tile_m);
    dim3 grid(ceil_div(d.cols, tile_n), ceil_div(d.rows, tile_m), d.batches * d.splits);
    auto mma_gemm_kernel_of_the_plan = mma_gemm_tile_kernel<Format, Problem>(tile_m, tile_n);
    LAUNCH(mma_gemm_kernel_of_the_plan, grid, MMA_THREADS, 0, stream, p, partial);
}

// Tensor cores need sm_80 or later (the CPU runtime is an H100).
static void require_tensor_cores(Precision precision) {
    if (precision == FP32) return;
    int device = 0, major = 0, minor = 0;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    cudaCheck(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    require(major >= 8, "--precision %s needs tensor cores with TF32/BF16 (sm_80 or later); device %d is sm_%d%d",
            PRECISION_NAMES[precision], device, major, minor);
}

template <typename Problem>
static void gemm_launch(Problem p, Workspace workspace, Precision precision, cudaStream_t stream) {
    require_tensor_cores(precision);
    gemm_carries(p.a);
    gemm_carries(p.b);
    GemmPlan plan = gemm_plan(p, workspace.ptr ? (long)workspace.floats : 0, precision);
    p.dims = plan.dims;
    float* partial = p.dims.splits > 1 ? workspace.ptr : nullptr;
    if (precision == TF32) mma_gemm_launch_tiles<MmaTf32>(p, plan.tile_m, plan.tile_n, partial, stream);
    else if (precision == BF16) mma_gemm_launch_tiles<MmaBf16>(p, plan.tile_m, plan.tile_n, partial, stream);
    else if (plan.tile_m == 64) gemm_launch_tiles<64, 128>(p, partial, stream);
    else if (plan.tile_n == 64) gemm_launch_tiles<128, 64>(p, partial, stream);
    else gemm_launch_tiles<128, 128>(p, partial, stream);
    if (partial) {
        long n = (long)p.dims.batches * p.dims.rows * p.dims.cols;
        LAUNCH(gemm_split_sum_kernel<Problem>, ceil_div(n, 256), 256, 0, stream, p, partial);
    }
}

// Bias gradient: dbias[k] = sum_{n < N, i < inner} dout[n][k][i] (inner = OH*OW for a
// conv, 1 for an fc layer). One block per k: each thread sums a fixed strided subset,
// then the block adds the 256 partial sums in a fixed tree: the same bits every run.
__global__ void bias_backward_kernel(float* dbias, const float* dout, int N, int K, int inner) {
    SHARED(float, partial, [256]);
    const int k = blockIdx.x, tid = threadIdx.x;
    float sum = 0.0f;
    for (long j = tid; j < (long)N * inner; j += 256) {
        long n = j / inner, i = j % inner;
        sum += dout[(n * K + k) * inner + i];
    }
    partial[tid] = sum;
    __syncthreads();
    for (int half = 128; half > 0; half /= 2) {
        if (tid < half) partial[tid] += partial[tid + half];
        __syncthreads();
    }
    if (tid == 0) dbias[k] = partial[0];
}

void bias_backward(float* dbias, const float* dout, int N, int K, int inner, cudaStream_t stream) {
    LAUNCH(bias_backward_kernel, K, 256, 0, stream, dbias, dout, N, K, inner);
}

// Convolution geometry, as in the launchers' arguments. The input is [N][C][H][W],
// the weight [K][C/groups][R][S], the output [N][K][OH][OW]; output pixel (oy, ox)
// sees input rows oy*stride - pad + r, r < R (likewise columns): anything outside the
// input reads 0, which covers both the padding and conv1's overhang on the
// bottom/right (224 -> 55 with k=11, stride 4: the last window ends at 226).
struct ConvShape {
    int N, C, H, W, K, R, S, stride, pad, groups, OH, OW;
    __host__ __device__ int cg() const { return C / groups; }  // channels per group
    __host__ __device__ int kg() const { return K / groups; }  // filters per group
};

// Shapes the convolution launchers accept; the C API reports the same messages.
// OH must be the floor (PyTorch) or ceil (cuda-convnet) output size; likewise OW.
static void conv_check_shape(const ConvShape& s) {
    require(s.N > 0 && s.C > 0 && s.H > 0 && s.W > 0 && s.K > 0 && s.R > 0 && s.S > 0,
            "conv: sizes must be positive (N=%d C=%d H=%d W=%d K=%d R=%d S=%d)",
            s.N, s.C, s.H, s.W, s.K, s.R, s.S);
    require(s.stride > 0 && s.pad >= 0, "conv: need stride > 0 and pad >= 0 (stride=%d pad=%d)",
            s.stride, s.pad);
    require(s.groups > 0 && s.C % s.groups == 0 && s.K % s.groups == 0,
            "conv: groups=%d must divide C=%d and K=%d", s.groups, s.C, s.K);
    require(s.pad < s.R && s.pad < s.S, "conv: pad=%d must be smaller than the %dx%d filter",
            s.pad, s.R, s.S);
    require(s.R <= s.H + 2 * s.pad && s.S <= s.W + 2 * s.pad,
            "conv: %dx%d filter larger than the padded %dx%d input", s.R, s.S, s.H, s.W);
    // image sides far below GEMM_OUTSIDE, so that no gathered y or x wraps around
    require(s.H <= 65536 && s.W <= 65536 && (long)s.R * s.stride <= 65536
            && (long)s.S * s.stride <= 65536,
            "conv: image sides, filter sides and strides beyond 65536 are not supported");
    auto fits = [&](int out, int in, int k) {
        long span = (long)in + 2 * s.pad - k;
        return out == 1 + span / s.stride || out == 1 + ceil_div(span, s.stride);
    };
    require(fits(s.OH, s.H, s.R) && fits(s.OW, s.W, s.S),
            "conv: output %dx%d inconsistent with input %dx%d, filter %dx%d, stride %d, pad %d",
            s.OH, s.OW, s.H, s.W, s.R, s.S, s.stride, s.pad);
    // products in double: exact below 2^53, and no overflow above
    require((double)s.N * s.C * s.H * s.W <= INT32_MAX
            && (double)s.N * s.K * s.OH * s.OW <= INT32_MAX
            && (double)s.K * s.cg() * s.R * s.S <= INT32_MAX,
            "conv: tensors over 2^31 elements are not supported");
}

// The unrolled input (im2col) as a gather along k = (c, r, s) from the origin of an
// output pixel: offset c*H*W + r*W + s, y = oy*stride - pad + r, x likewise.
static GemmGather conv_input_by_crs(const float* inp, const ConvShape& s) {
    GemmGather g{inp};
    g.radix1 = s.R, g.radix2 = s.S;
    g.stride0 = s.H * s.W, g.stride1 = s.W, g.stride2 = 1;
    g.step_y = 1, g.step_x = 1;
    g.height = s.H, g.width = s.W;
    return g;
}

// Forward: out[n][k][oy][ox] = [relu](bias[k] + sum_{c,r,s} w[k][c][r][s] *
// inp[n][g*C/groups + c][oy*stride - pad + r][ox*stride - pad + s]), g = k's group.
// GEMM per group: A = the group's weights [K/groups][C/groups*R*S] (rows contiguous),
// B = the unrolled input (consecutive columns are neighbouring output pixels, hence
// neighbouring input pixels).
struct ConvForward {
    GemmDims dims;
    GemmGather a, b;
    ConvShape s;
    float* out;
    const float* bias;
    bool relu;
    static constexpr bool a_k_contiguous = true, b_k_contiguous = false;
    static constexpr bool a_strided = true, b_strided = false;

    ConvForward(const ConvShape& s_, float* out_, const float* inp, const float* weight,
                const float* bias_, bool relu_)
        : dims{s_.kg(), s_.N * s_.OH * s_.OW, s_.cg() * s_.R * s_.S, s_.groups},
          a{weight}, b(conv_input_by_crs(inp, s_)), s(s_), out(out_), bias(bias_), relu(relu_) {}

    __device__ int batch(int z) const { return z; }  // the group
    __device__ GemmOrigin a_origin(int g, int m) const {
        return {(g * s.kg() + m) * dims.depth, 0, 0};
    }
    __device__ GemmOrigin b_origin(int g, int n) const {  // output pixel (image, oy, ox)
        int image = n / (s.OH * s.OW), oy = n / s.OW % s.OH, ox = n % s.OW;
        int y = oy * s.stride - s.pad, x = ox * s.stride - s.pad;
        return {((image * s.C + g * s.cg()) * s.H + y) * s.W + x, y, x};
    }
    __device__ void store(int g, int m, int n, float v) const {
        int k = g * s.kg() + m, image = n / (s.OH * s.OW), opix = n % (s.OH * s.OW);
        v += bias[k];
        out[((long)image * s.K + k) * s.OH * s.OW + opix] = relu ? fmaxf(v, 0.0f) : v;
    }
};

// Backward data: dinp[n][c][y][x] = sum over filters k of c's group and taps (r, s)
// with y = oy*stride - pad + r, x = ox*stride - pad + s for an output pixel (oy, ox)
// of dout[n][k][oy][ox] * w[k][c][r][s].
// Only taps with r = (y + pad) mod stride (+ multiples of stride) reach pixel y, so the
// pixels are split into stride x stride phases (py, px) = ((y+pad) % stride,
// (x+pad) % stride); within a phase every pixel uses the same ceil(R/stride) x
// ceil(S/stride) taps and the product is dense (conv1: 16x less work than gathering
// zeros). GEMM per (phase, group): rows = input channels, columns = the phase's pixels
// (image, i, j) with y = y0 + i*stride, reduction over k = (filter, jr, js), the tap
// r = py + jr*stride, s = px + js*stride (A reads 0 past the filter's edge); B is
// dout[n][filter][oy0 + i - jr][ox0 + j - js], or 0 outside the output.
// Pixels that no window covers get 0.
struct ConvBackwardData {
    GemmDims dims;
    GemmGather a, b;
    ConvShape s;
    float* dinp;
    int phase_h, phase_w;  // pixels of a phase along y and x
    static constexpr bool a_k_contiguous = true, b_k_contiguous = false;
    static constexpr bool a_strided = false, b_strided = false;

    ConvBackwardData(const ConvShape& s_, float* dinp_, const float* dout, const float* weight)
        : s(s_), dinp(dinp_) {
        phase_h = ceil_div(s.H, s.stride), phase_w = ceil_div(s.W, s.stride);
        int taps_r = ceil_div(s.R, s.stride), taps_s = ceil_div(s.S, s.stride);
        dims = GemmDims{s.cg(), s.N * phase_h * phase_w, s.kg() * taps_r * taps_s,
                        s.groups * s.stride * s.stride};
        a = GemmGather{weight};  // w[g*kg + filter][m][r][s]
        a.radix1 = taps_r, a.radix2 = taps_s;
        a.stride0 = s.cg() * s.R * s.S, a.stride1 = s.stride * s.S, a.stride2 = s.stride;
        a.step_y = s.stride, a.step_x = s.stride;
        a.height = s.R, a.width = s.S;
        b = GemmGather{dout};  // dout[image][g*kg + filter][oy][ox]
        b.radix1 = taps_r, b.radix2 = taps_s;
        b.stride0 = s.OH * s.OW, b.stride1 = -s.OW, b.stride2 = -1;
        b.step_y = -1, b.step_x = -1;
        b.height = s.OH, b.width = s.OW;
    }

    // Constants of one (phase, group) GEMM, computed once per block: the phase's first
    // pixel (y0, x0) (the smallest y >= 0 with (y + pad) % stride == py) and the output
    // pixel (oy0, ox0) its first tap (py, px) reads.
    struct Phase {
        int g, py, px, y0, x0, oy0, ox0;
    };
    __device__ Phase batch(int z) const {
        Phase ph;
        ph.g = z % s.groups;
        ph.py = z / s.groups / s.stride;
        ph.px = z / s.groups % s.stride;
        ph.y0 = ((ph.py - s.pad) % s.stride + s.stride) % s.stride;
        ph.x0 = ((ph.px - s.pad) % s.stride + s.stride) % s.stride;
        ph.oy0 = (ph.y0 + s.pad - ph.py) / s.stride;
        ph.ox0 = (ph.x0 + s.pad - ph.px) / s.stride;
        return ph;
    }
    __device__ GemmOrigin a_origin(const Phase& ph, int m) const {  // tap (py, px) of channel m
        return {((ph.g * s.kg() * s.cg() + m) * s.R + ph.py) * s.S + ph.px, ph.py, ph.px};
    }
    __device__ GemmOrigin b_origin(const Phase& ph, int n) const {  // pixel (image, i, j)
        int image = n / (phase_h * phase_w), i = n / phase_w % phase_h, j = n % phase_w;
        int oy = ph.oy0 + i, ox = ph.ox0 + j;
        return {((image * s.K + ph.g * s.kg()) * s.OH + oy) * s.OW + ox, oy, ox};
    }
    __device__ void store(const Phase& ph, int m, int n, float v) const {
        int image = n / (phase_h * phase_w), pix = n % (phase_h * phase_w);
        int y = ph.y0 + pix / phase_w * s.stride, x = ph.x0 + pix % phase_w * s.stride;
        if (y < s.H && x < s.W)
            dinp[(((long)image * s.C + ph.g * s.cg() + m) * s.H + y) * s.W + x] = v;
    }
};

// Backward weights: dw[k][c][r][s] = sum_{n,oy,ox} dout[n][k][oy][ox] *
// inp[n][g*C/groups + c][oy*stride - pad + r][ox*stride - pad + s]. GEMM per group:
// A = the output gradient [K/groups][N*OH*OW], B = the unrolled input transposed: its
// columns are the taps (c, r, s) and its reduction k = (image, oy, ox), so B's origin
// is the tap and its steps walk the output pixels. The reduction is long (conv1:
// 55*55*N) and the output small, so this is the product that splits most.
// The bias gradient is bias_backward's.
struct ConvBackwardWeights {
    GemmDims dims;
    GemmGather a, b;
    ConvShape s;
    float* dweight;
    static constexpr bool a_k_contiguous = true, b_k_contiguous = true;
    static constexpr bool a_strided = false, b_strided = false;

    ConvBackwardWeights(const ConvShape& s_, float* dweight_, const float* dout, const float* inp)
        : dims{s_.kg(), s_.cg() * s_.R * s_.S, s_.N * s_.OH * s_.OW, s_.groups},
          a{dout}, b{inp}, s(s_), dweight(dweight_) {
        a.radix1 = s.OH * s.OW;  // k = (image, output pixel)
        a.stride0 = s.K * s.OH * s.OW, a.stride1 = 1;
        b.radix1 = s.OH, b.radix2 = s.OW;  // k = (image, oy, ox)
        b.stride0 = s.C * s.H * s.W, b.stride1 = s.stride * s.W, b.stride2 = s.stride;
        b.step_y = s.stride, b.step_x = s.stride;
        b.height = s.H, b.width = s.W;
    }

    __device__ int batch(int z) const { return z; }  // the group
    __device__ GemmOrigin a_origin(int g, int m) const {
        return {(g * s.kg() + m) * s.OH * s.OW, 0, 0};
    }
    __device__ GemmOrigin b_origin(int g, int n) const {  // tap (c, r, s) at output pixel 0
        int c = n / (s.R * s.S), r = n / s.S % s.R, t = n % s.S;
        int y = r - s.pad, x = t - s.pad;
        return {((g * s.cg() + c) * s.H + y) * s.W + x, y, x};
    }
    __device__ void store(int g, int m, int n, float v) const {
        dweight[((long)g * s.kg() + m) * dims.cols + n] = v;
    }
};

// Floats of workspace that the three convolution launchers need for this shape.
size_t conv_workspace(int N, int C, int H, int W, int K, int R, int S, int stride, int pad,
                      int groups, int OH, int OW) {
    ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
    conv_check_shape(s);
    return std::max({gemm_workspace(ConvForward(s, nullptr, nullptr, nullptr, nullptr, false)),
                     gemm_workspace(ConvBackwardData(s, nullptr, nullptr, nullptr)),
                     gemm_workspace(ConvBackwardWeights(s, nullptr, nullptr, nullptr))});
}

void conv_forward(float* out, const float* inp, const float* weight, const float* bias,
                  int N, int C, int H, int W, int K, int R, int S, int stride, int pad,
                  int groups, int OH, int OW, bool relu, Workspace workspace,
                  Precision precision, cudaStream_t stream) {
    ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
    conv_check_shape(s);
    gemm_launch(ConvForward(s, out, inp, weight, bias, relu), workspace, precision, stream);
}

void conv_backward_data(float* dinp, const float* dout, const float* weight,
                        int N, int C, int H, int W, int K, int R, int S, int stride, int pad,
                        int groups, int OH, int OW, Workspace workspace, Precision precision, cudaStream_t stream) {
    ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
    conv_check_shape(s);
    require((long)groups * stride * stride <= 65535, "conv_backward_data: stride %d too large",
            stride);
    gemm_launch(ConvBackwardData(s, dinp, dout, weight), workspace, precision, stream);
}

void conv_backward_weights(float* dweight, float* dbias, const float* dout, const float* inp,
                           int N, int C, int H, int W, int K, int R, int S, int stride,
                           int pad, int groups, int OH, int OW, Workspace workspace,
                           Precision precision, cudaStream_t stream) {
    ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
    conv_check_shape(s);
    gemm_launch(ConvBackwardWeights(s, dweight, dout, inp), workspace, precision, stream);
    bias_backward(dbias, dout, N, K, OH * OW, stream);
}

// ----------------------------------------------------------------------------
// 4. ReLU
//
// Elementwise kernels (ReLU here, dropout, SGD) give each thread 4 consecutive elements:
// one 16-byte access per array when the group is whole and aligned (cudaMalloc'd
// buffers are), element by element at the tail.
__device__ __forceinline__ void load4(float v[4], const float* p, long i, long n) {
    if (i + 4 <= n && ((uintptr_t)(p + i) & 15) == 0) {
        float4 q = *(const float4*)(p + i);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        for (int j = 0; j < 4; j++) v[j] = i + j < n ? p[i + j] : 0.0f;
    }
}

__device__ __forceinline__ void store4(float* p, const float v[4], long i, long n) {
    if (i + 4 <= n && ((uintptr_t)(p + i) & 15) == 0) {
        *(float4*)(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        for (int j = 0; j < 4; j++) if (i + j < n) p[i + j] = v[j];
    }
}

static const int ELEMENTWISE_THREADS = 256;

static int elementwise_blocks(long n) { return ceil_div(ceil_div(n, 4), ELEMENTWISE_THREADS); }

// relu_forward: out = max(inp, 0). relu_backward: dinp = out > 0 ? dout : 0, from the
// forward's output (conv and fc fuse the forward into their epilogue; the model calls
// relu_backward before their backward). Each thread reads its elements before writing
// them, so both may run in place (out == inp, dinp == dout): no __restrict__.
__global__ void relu_forward_kernel(float* out, const float* inp, long n) {
    long i = 4 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    float v[4];
    load4(v, inp, i, n);
    for (int j = 0; j < 4; j++) v[j] = v[j] > 0.0f ? v[j] : 0.0f;
    store4(out, v, i, n);
}

__global__ void relu_backward_kernel(float* dinp, const float* dout, const float* out, long n) {
    long i = 4 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    float d[4], o[4];
    load4(d, dout, i, n);
    load4(o, out, i, n);
    for (int j = 0; j < 4; j++) d[j] = o[j] > 0.0f ? d[j] : 0.0f;
    store4(dinp, d, i, n);
}

static void elementwise_check(const char* op, long n) {
    require(n > 0, "%s: the element count must be positive (got %ld)", op, n);
    require(n <= 4L * INT32_MAX, "%s: %ld elements is too many", op, n);
}

void relu_forward(float* out, const float* inp, long n, cudaStream_t stream) {
    elementwise_check("relu_forward", n);
    LAUNCH(relu_forward_kernel, elementwise_blocks(n), ELEMENTWISE_THREADS, 0, stream, out, inp, n);
}

void relu_backward(float* dinp, const float* dout, const float* out, long n, cudaStream_t stream) {
    elementwise_check("relu_backward", n);
    LAUNCH(relu_backward_kernel, elementwise_blocks(n), ELEMENTWISE_THREADS, 0, stream, dinp, dout, out, n);
}

// ----------------------------------------------------------------------------
// 5. Local response normalisation: across channels (the paper's), within a map (5b)
//
//   out[c] = inp[c] * scale[c]^-beta,  scale[c] = k + alpha/size * sum_{j in win(c)} inp[j]^2
//   win(c) = [c - size/2, c + (size-1)/2] clipped to [0, C-1]
// over the C channels of one tower at one pixel (paper: size 5, alpha 1e-4, beta 0.75,
// k 2; the authors' code divides alpha by size, as here). scale is saved for backward.
// Backward, with r[j] = dout[j] * out[j] / scale[j]:
//   dinp[i] = dout[i] * scale[i]^-beta - 2*alpha*beta/size * inp[i] * sum_{j: i in win(j)} r[j]
// and i is in win(j) exactly when j is in [i - (size-1)/2, i + size/2].
// One thread per pixel (n, y, x): consecutive threads take consecutive x, so each access
// to a channel plane is coalesced. The thread walks c = 0..C-1 keeping the window sum,
// adding the term that enters and subtracting the one that leaves (as Caffe does): O(1)
// per channel instead of O(size). The subtracted term is recomputed bit for bit, so the
// only drift is rounding, at most ~2C ulps of the largest window sum.

__global__ void lrn_forward_kernel(float* __restrict__ out, float* __restrict__ scale,
                                   const float* __restrict__ inp, int N, int C, int HW,
                                   int size, float alpha_over_size, float beta, float k) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * HW) return;
    long base = (long)(t / HW) * C * HW + t % HW;
    const float* a = inp + base;
    int before = size / 2, after = (size - 1) / 2;
    float sum = 0.0f;
    for (int j = 0; j < after && j < C; j++) sum += a[(long)j * HW] * a[(long)j * HW];
    for (int c = 0; c < C; c++) {
        int enter = c + after, leave = c - before - 1;
        if (enter < C) sum += a[(long)enter * HW] * a[(long)enter * HW];
        if (leave >= 0) sum -= a[(long)leave * HW] * a[(long)leave * HW];
        float s = k + alpha_over_size * sum;
        scale[base + (long)c * HW] = s;
        out[base + (long)c * HW] = a[(long)c * HW] * powf(s, -beta);
    }
}

__global__ void lrn_backward_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                    const float* __restrict__ inp, const float* __restrict__ out,
                                    const float* __restrict__ scale, int N, int C, int HW, int size,
                                    float alpha_over_size, float beta) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * HW) return;
    long base = (long)(t / HW) * C * HW + t % HW;
    dout += base; inp += base; out += base; scale += base; dinp += base;
    int before = (size - 1) / 2, after = size / 2;  // the transposed window
    float sum = 0.0f;
    for (int j = 0; j < after && j < C; j++) {
        long o = (long)j * HW;
        sum += dout[o] * out[o] / scale[o];
    }
    for (int c = 0; c < C; c++) {
        int enter = c + after, leave = c - before - 1;
        if (enter < C) {
            long o = (long)enter * HW;
            sum += dout[o] * out[o] / scale[o];
        }
        if (leave >= 0) {
            long o = (long)leave * HW;
            sum -= dout[o] * out[o] / scale[o];
        }
        long o = (long)c * HW;
        dinp[o] = dout[o] * powf(scale[o], -beta) - 2.0f * alpha_over_size * beta * inp[o] * sum;
    }
}

static long lrn_check(int N, int C, int H, int W, int size, float alpha, float beta, float k) {
    require(N > 0 && C > 0 && H > 0 && W > 0, "lrn: sizes must be positive (N=%d C=%d H=%d W=%d)", N, C, H, W);
    require(size > 0, "lrn: window size must be positive (got %d)", size);
    require(k > 0.0f && alpha >= 0.0f && isfinite(alpha) && isfinite(beta) && isfinite(k),
            "lrn: need k > 0, alpha >= 0 and finite beta (k=%g alpha=%g beta=%g)", k, alpha, beta);
    require((long)N * C * H * W <= INT32_MAX, "lrn: tensor too large");
    return (long)N * C * H * W;
}

void lrn_forward(float* out, float* scale, const float* inp, int N, int C, int H, int W,
                 int size, float alpha, float beta, float k, cudaStream_t stream) {
    lrn_check(N, C, H, W, size, alpha, beta, k);
    const int threads = 256;
    LAUNCH(lrn_forward_kernel, ceil_div((long)N * H * W, threads), threads, 0, stream,
           out, scale, inp, N, C, H * W, size, alpha / size, beta, k);
}

void lrn_backward(float* dinp, const float* dout, const float* inp, const float* out,
                  const float* scale, int N, int C, int H, int W, int size, float alpha,
                  float beta, float k, cudaStream_t stream) {
    lrn_check(N, C, H, W, size, alpha, beta, k);
    const int threads = 256;
    LAUNCH(lrn_backward_kernel, ceil_div((long)N * H * W, threads), threads, 0, stream,
           dinp, dout, inp, out, scale, N, C, H * W, size, alpha / size, beta);
}

// --- 5b. Response normalisation within a map (the authors' 2012 code: conv2, after the LRN)
//
//   out[y][x] = inp[y][x] * scale[y][x]^-beta,
//   scale[y][x] = k + alpha/size^2 * sum_{(j, i) in win(y, x)} inp[j][i]^2
//   win(y, x) = rows [y - size/2, y + (size-1)/2] x columns [x - size/2, x + (size-1)/2],
// clipped to the map (fewer terms at the borders, not renormalised), each channel plane on
// its own. cuda-convnet's "rnorm" layer; its alpha is divided by the window's area, as the
// cross-map LRN's is by its length. Backward, with r = dout * out / scale:
//   dinp[p] = dout[p] * scale[p]^-beta - 2*alpha*beta/size^2 * inp[p] * sum_{q: p in win(q)} r[q]
// and p is in win(q) exactly when q is in the transposed window (size/2 and (size-1)/2
// swapped), as in lrn_backward.
// One block per (n, c) plane: its threads stage the plane's squares (forward) or r
// (backward) in shared memory with coalesced loads, then each thread sums its windows from
// there, so every input is read from global memory once instead of size^2 times.

static const int SPATIAL_NORM_THREADS = 256;
static const int SPATIAL_NORM_MAX_PLANE = 48 * 1024 / 4;  // floats of one plane in 48 KB of shared memory

// Sum of plane[j][i] over rows [y - before, y + after] x columns [x - before, x + after],
// clipped to the H x W plane; rows outer, columns inner (the NumPy twin's order).
__device__ __forceinline__ float plane_window_sum(const float* plane, int H, int W, int y, int x, int before,
                                                  int after) {
    float sum = 0.0f;
    for (int j = max(0, y - before); j <= min(H - 1, y + after); j++)
        for (int i = max(0, x - before); i <= min(W - 1, x + after); i++) sum += plane[j * W + i];
    return sum;
}

__global__ void spatial_norm_forward_kernel(float* __restrict__ out, float* __restrict__ scale,
                                            const float* __restrict__ inp, int H, int W, int size,
                                            float alpha_over_area, float beta, float k) {
    EXTERN_SHARED(float, squares);  // [H * W]
    const long base = (long)blockIdx.x * H * W;
    for (int p = threadIdx.x; p < H * W; p += blockDim.x) squares[p] = inp[base + p] * inp[base + p];
    __syncthreads();
    for (int p = threadIdx.x; p < H * W; p += blockDim.x) {
        float s = k + alpha_over_area * plane_window_sum(squares, H, W, p / W, p % W, size / 2, (size - 1) / 2);
        scale[base + p] = s;
        out[base + p] = inp[base + p] * powf(s, -beta);
    }
}

__global__ void spatial_norm_backward_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                             const float* __restrict__ inp, const float* __restrict__ out,
                                             const float* __restrict__ scale, int H, int W, int size,
                                             float alpha_over_area, float beta) {
    EXTERN_SHARED(float, r);  // [H * W]
    const long base = (long)blockIdx.x * H * W;
    for (int p = threadIdx.x; p < H * W; p += blockDim.x) r[p] = dout[base + p] * out[base + p] / scale[base + p];
    __syncthreads();
    for (int p = threadIdx.x; p < H * W; p += blockDim.x) {
        float sum = plane_window_sum(r, H, W, p / W, p % W, (size - 1) / 2, size / 2);
        dinp[base + p] = dout[base + p] * powf(scale[base + p], -beta) -
                         2.0f * alpha_over_area * beta * inp[base + p] * sum;
    }
}

static long spatial_norm_check(int N, int C, int H, int W, int size, float alpha, float beta, float k) {
    require(N > 0 && C > 0 && H > 0 && W > 0, "spatial_norm: sizes must be positive (N=%d C=%d H=%d W=%d)", N, C,
            H, W);
    require(size > 0 && size <= 64, "spatial_norm: window size must be in 1..64 (got %d)", size);
    require(k > 0.0f && alpha >= 0.0f && isfinite(alpha) && isfinite(beta) && isfinite(k),
            "spatial_norm: need k > 0, alpha >= 0 and finite beta (k=%g alpha=%g beta=%g)", k, alpha, beta);
    require((long)H * W <= SPATIAL_NORM_MAX_PLANE, "spatial_norm: a %dx%d map does not fit in shared memory (at most %d pixels)",
            H, W, SPATIAL_NORM_MAX_PLANE);
    require((long)N * C <= INT32_MAX && (long)N * C * H * W <= INT32_MAX, "spatial_norm: tensor too large");
    return (long)N * C * H * W;
}

void spatial_norm_forward(float* out, float* scale, const float* inp, int N, int C, int H, int W, int size,
                          float alpha, float beta, float k, cudaStream_t stream) {
    spatial_norm_check(N, C, H, W, size, alpha, beta, k);
    LAUNCH(spatial_norm_forward_kernel, N * C, SPATIAL_NORM_THREADS, (size_t)H * W * sizeof(float), stream,
           out, scale, inp, H, W, size, alpha / (size * size), beta, k);
}

void spatial_norm_backward(float* dinp, const float* dout, const float* inp, const float* out, const float* scale,
                           int N, int C, int H, int W, int size, float alpha, float beta, float k,
                           cudaStream_t stream) {
    spatial_norm_check(N, C, H, W, size, alpha, beta, k);
    LAUNCH(spatial_norm_backward_kernel, N * C, SPATIAL_NORM_THREADS, (size_t)H * W * sizeof(float), stream,
           dinp, dout, inp, out, scale, H, W, size, alpha / (size * size), beta);
}

// ----------------------------------------------------------------------------
// 6. Max pooling
//
//   out[n][c][oy][ox] = max over inp[n][c][oy*stride + dy][ox*stride + dx], 0 <= dy, dx < size
// (AlexNet: size 3, stride 2, overlapping windows). A window that overhangs the bottom or
// right edge is clipped. Ties go to the first maximum in window order (row-major), so
// forward and backward agree on one winner and match alexnet.py.
// Forward: one thread per output, consecutive threads along ox.
// Backward gathers instead of scattering: one thread per input pixel visits the (at most
// ceil(size/stride)^2) windows that contain it, recomputes each window's winner and sums
// the gradients of the windows it won, in (oy, ox) order. No atomics, so deterministic;
// the window reads hit the cache lines that neighbouring threads read too.

__device__ __forceinline__ int window_argmax(const float* plane, int W, int y0, int x0, int y1, int x1) {
    int best = y0 * W + x0;
    float best_value = plane[best];
    for (int y = y0; y < y1; y++)
        for (int x = x0; x < x1; x++)
            if (plane[y * W + x] > best_value) {
                best = y * W + x;
                best_value = plane[best];
            }
    return best;
}

__global__ void maxpool_forward_kernel(float* __restrict__ out, const float* __restrict__ inp,
                                       int NC, int H, int W, int size, int stride, int OH, int OW) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= NC * OH * OW) return;
    int ox = t % OW, oy = t / OW % OH, nc = t / (OW * OH);
    const float* plane = inp + (long)nc * H * W;
    int y0 = oy * stride, x0 = ox * stride;
    out[t] = plane[window_argmax(plane, W, y0, x0, min(y0 + size, H), min(x0 + size, W))];
}

__global__ void maxpool_backward_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                        const float* __restrict__ inp, int NC, int H, int W,
                                        int size, int stride, int OH, int OW) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= NC * H * W) return;
    int ix = t % W, iy = t / W % H, nc = t / (W * H);
    const float* plane = inp + (long)nc * H * W;
    const float* grad = dout + (long)nc * OH * OW;
    // windows oy with oy*stride <= iy < oy*stride + size
    int oy0 = iy < size ? 0 : (iy - size) / stride + 1, oy1 = min(iy / stride, OH - 1);
    int ox0 = ix < size ? 0 : (ix - size) / stride + 1, ox1 = min(ix / stride, OW - 1);
    float sum = 0.0f;
    for (int oy = oy0; oy <= oy1; oy++)
        for (int ox = ox0; ox <= ox1; ox++) {
            int y0 = oy * stride, x0 = ox * stride;
            if (window_argmax(plane, W, y0, x0, min(y0 + size, H), min(x0 + size, W)) == iy * W + ix)
                sum += grad[oy * OW + ox];
        }
    dinp[t] = sum;
}

static void maxpool_check(int N, int C, int H, int W, int size, int stride, int OH, int OW) {
    require(N > 0 && C > 0 && H > 0 && W > 0, "maxpool: sizes must be positive (N=%d C=%d H=%d W=%d)", N, C, H, W);
    require(size > 0 && stride > 0 && size <= H && size <= W,
            "maxpool: need 0 < size <= H, W and stride > 0 (size=%d stride=%d, input %dx%d)", size, stride, H, W);
    require(OH > 0 && OW > 0 && (long)(OH - 1) * stride < H && (long)(OW - 1) * stride < W,
            "maxpool: output %dx%d does not fit a %dx%d input with stride %d", OH, OW, H, W, stride);
    require((long)N * C * H * W <= INT32_MAX, "maxpool: tensor too large");
}

void maxpool_forward(float* out, const float* inp, int N, int C, int H, int W, int size,
                     int stride, int OH, int OW, cudaStream_t stream) {
    maxpool_check(N, C, H, W, size, stride, OH, OW);
    const int threads = 256;
    LAUNCH(maxpool_forward_kernel, ceil_div((long)N * C * OH * OW, threads), threads, 0, stream,
           out, inp, N * C, H, W, size, stride, OH, OW);
}

void maxpool_backward(float* dinp, const float* dout, const float* inp, int N, int C, int H,
                      int W, int size, int stride, int OH, int OW, cudaStream_t stream) {
    maxpool_check(N, C, H, W, size, stride, OH, OW);
    const int threads = 256;
    LAUNCH(maxpool_backward_kernel, ceil_div((long)N * C * H * W, threads), threads, 0, stream,
           dinp, dout, inp, N * C, H, W, size, stride, OH, OW);
}

// ----------------------------------------------------------------------------
// 7. Fully connected

// The three fully connected products on the GEMM core of section 3, with
// inp [N][in], weight [out][in], bias [out], out [N][out]. Every operand is a plain
// strided matrix: GemmGather{data} with stride0 = the distance between consecutive k.
// At batch 128 the forward and backward-data products have few tiles and a long
// reduction, so gemm_launch splits them (split-K).
static GemmGather fc_matrix(const float* data, int k_stride) {
    GemmGather g{data};
    g.stride0 = k_stride;
    return g;
}

// Forward: out[n][o] = [relu](bias[o] + sum_i inp[n][i] * w[o][i]).
// GEMM rows = images, columns = output features; A = inp and B = w transposed are
// both read along the reduction (rows of inp and of w are contiguous).
struct FcForward {
    GemmDims dims;
    GemmGather a, b;
    float* out;
    const float* bias;
    bool relu;
    static constexpr bool a_k_contiguous = true, b_k_contiguous = true;
    static constexpr bool a_strided = true, b_strided = true;

    FcForward(int N, int in, int out_features, float* out_, const float* inp, const float* weight,
              const float* bias_, bool relu_)
        : dims{N, out_features, in, 1}, a(fc_matrix(inp, 1)), b(fc_matrix(weight, 1)),
          out(out_), bias(bias_), relu(relu_) {}

    __device__ int batch(int) const { return 0; }  // a single GEMM
    __device__ GemmOrigin a_origin(int, int m) const { return {m * dims.depth, 0, 0}; }
    __device__ GemmOrigin b_origin(int, int n) const { return {n * dims.depth, 0, 0}; }
    __device__ void store(int, int m, int n, float v) const {
        v += bias[n];
        out[(long)m * dims.cols + n] = relu ? fmaxf(v, 0.0f) : v;
    }
};

// Backward data: dinp[n][i] = sum_o dout[n][o] * w[o][i].
// GEMM rows = images, columns = input features, reduction over output features;
// A = dout is read along the reduction, B = w along the columns.
struct FcBackwardData {
    GemmDims dims;
    GemmGather a, b;
    float* dinp;
    static constexpr bool a_k_contiguous = true, b_k_contiguous = false;
    static constexpr bool a_strided = true, b_strided = true;

    FcBackwardData(int N, int in, int out_features, float* dinp_, const float* dout,
                   const float* weight)
        : dims{N, in, out_features, 1}, a(fc_matrix(dout, 1)), b(fc_matrix(weight, in)),
          dinp(dinp_) {}

    __device__ int batch(int) const { return 0; }  // a single GEMM
    __device__ GemmOrigin a_origin(int, int m) const { return {m * dims.depth, 0, 0}; }
    __device__ GemmOrigin b_origin(int, int n) const { return {n, 0, 0}; }
    __device__ void store(int, int m, int n, float v) const {
        dinp[(long)m * dims.cols + n] = v;
    }
};

// Backward weights: dw[o][i] = sum_n dout[n][o] * inp[n][i].
// GEMM rows = output features, columns = input features, reduction over the batch;
// A = dout transposed and B = inp are both read along their rows (a batch row is
// contiguous). The bias gradient is bias_backward's.
struct FcBackwardWeights {
    GemmDims dims;
    GemmGather a, b;
    float* dweight;
    static constexpr bool a_k_contiguous = false, b_k_contiguous = false;
    static constexpr bool a_strided = true, b_strided = true;

    FcBackwardWeights(int N, int in, int out_features, float* dweight_, const float* dout,
                      const float* inp)
        : dims{out_features, in, N, 1}, a(fc_matrix(dout, out_features)), b(fc_matrix(inp, in)),
          dweight(dweight_) {}

    __device__ int batch(int) const { return 0; }  // a single GEMM
    __device__ GemmOrigin a_origin(int, int m) const { return {m, 0, 0}; }
    __device__ GemmOrigin b_origin(int, int n) const { return {n, 0, 0}; }
    __device__ void store(int, int m, int n, float v) const {
        dweight[(long)m * dims.cols + n] = v;
    }
};

static void fc_check_shape(int N, int in, int out_features) {
    require(N > 0 && in > 0 && out_features > 0,
            "fc: sizes must be positive (N=%d in=%d out=%d)", N, in, out_features);
    require((double)N * in <= INT32_MAX && (double)N * out_features <= INT32_MAX
            && (double)in * out_features <= INT32_MAX,
            "fc: tensors over 2^31 elements are not supported");
}

// Floats of workspace that the three fully connected launchers need for this shape.
size_t fc_workspace(int N, int in, int out_features) {
    fc_check_shape(N, in, out_features);
    return std::max({gemm_workspace(FcForward(N, in, out_features, nullptr, nullptr, nullptr,
                                              nullptr, false)),
                     gemm_workspace(FcBackwardData(N, in, out_features, nullptr, nullptr, nullptr)),
                     gemm_workspace(FcBackwardWeights(N, in, out_features, nullptr, nullptr,
                                                      nullptr))});
}

void fc_forward(float* out, const float* inp, const float* weight, const float* bias,
                int N, int in, int out_features, bool relu, Workspace workspace,
                Precision precision, cudaStream_t stream) {
    fc_check_shape(N, in, out_features);
    gemm_launch(FcForward(N, in, out_features, out, inp, weight, bias, relu), workspace, precision, stream);
}

void fc_backward_data(float* dinp, const float* dout, const float* weight, int N, int in,
                      int out_features, Workspace workspace, Precision precision, cudaStream_t stream) {
    fc_check_shape(N, in, out_features);
    gemm_launch(FcBackwardData(N, in, out_features, dinp, dout, weight), workspace, precision, stream);
}

void fc_backward_weights(float* dweight, float* dbias, const float* dout, const float* inp,
                         int N, int in, int out_features, Workspace workspace,
                         Precision precision, cudaStream_t stream) {
    fc_check_shape(N, in, out_features);
    gemm_launch(FcBackwardWeights(N, in, out_features, dweight, dout, inp), workspace, precision, stream);
    bias_backward(dbias, dout, N, out_features, 1, stream);
}

// ----------------------------------------------------------------------------
// 8. Dropout
//
// Paper semantics: in training each unit is zeroed with probability p and survivors pass
// unscaled; at test time every unit is multiplied by (1 - p).
// The mask rule (alexnet.py's dropout_mask implements the same): element i of layer L at
// step t with seed s is kept iff philox_uniform(word) >= p, where
//   word = philox4x32(counter = (i / 4, L, t mod 2^32, t / 2^32),
//                     key = (s mod 2^32, s / 2^32)).word[i % 4]
// so one Philox call serves 4 consecutive elements: one thread each. The backward pass
// regenerates the mask from the same (s, L, t) instead of storing it; every dropout layer
// of every tower needs its own L, or their masks coincide. Both passes may run
// in place (out == inp), as the elementwise kernels of section 4.

__global__ void dropout_kernel(float* out, const float* inp, long n, float p,
                               uint32_t key0, uint32_t key1, uint32_t layer, uint32_t step0,
                               uint32_t step1, bool train) {
    long group = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long i = 4 * group;
    if (i >= n) return;
    float v[4];
    load4(v, inp, i, n);
    if (train) {
        Philox4 r = philox4x32((uint32_t)group, layer, step0, step1, key0, key1);
        for (int j = 0; j < 4; j++) v[j] = philox_uniform(r.word[j]) >= p ? v[j] : 0.0f;
    } else {
        for (int j = 0; j < 4; j++) v[j] *= 1.0f - p;
    }
    store4(out, v, i, n);
}

static void dropout_check(const char* op, long n, float p) {
    elementwise_check(op, n);
    require(p >= 0.0f && p < 1.0f, "%s: the drop probability must be in [0, 1) (got %g)", op, p);
}

void dropout_forward(float* out, const float* inp, long n, float p, uint64_t seed,
                     uint32_t layer, uint64_t step, bool train, cudaStream_t stream) {
    dropout_check("dropout_forward", n, p);
    LAUNCH(dropout_kernel, elementwise_blocks(n), ELEMENTWISE_THREADS, 0, stream, out, inp, n, p,
           (uint32_t)seed, (uint32_t)(seed >> 32), layer, (uint32_t)step, (uint32_t)(step >> 32), train);
}

void dropout_backward(float* dinp, const float* dout, long n, float p, uint64_t seed,
                      uint32_t layer, uint64_t step, cudaStream_t stream) {
    dropout_check("dropout_backward", n, p);
    LAUNCH(dropout_kernel, elementwise_blocks(n), ELEMENTWISE_THREADS, 0, stream, dinp, dout, n, p,
           (uint32_t)seed, (uint32_t)(seed >> 32), layer, (uint32_t)step, (uint32_t)(step >> 32), true);
}

// ----------------------------------------------------------------------------
// 9. Softmax and cross-entropy
//
// One block of 128 threads per row of logits x[0..K-1] (K = 1000 classes: ~8 per thread). With m = max x,
//   prob[j] = exp(x[j] - m) / sum_i exp(x[i] - m)
//   loss    = log(sum_i exp(x[i] - m)) + m - x[label]      (no overflow for any logits)
//   dlogits = (prob - onehot(label)) / N                   (gradient of the batch-mean loss)
// Top-k: rank = #{j : x[j] > x[label]} + #{j < label : x[j] == x[label]}, i.e. the
// label's position in a stable descending sort (ties rank the lower class first);
// top-1 correct iff rank < 1, top-5 iff rank < 5; a row with a NaN logit is never
// correct (comparisons with NaN are false, which would rank its label first).
// Reductions: warp shuffles, then one partial per warp in shared memory, combined in a
// fixed order (deterministic).

static const int SOFTMAX_THREADS = 128;

struct SumOp {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduce v over the block (blockDim.x a multiple of 32); every thread gets the result.
// partial: shared scratch with one slot per warp.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* partial, Op op) {
    for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    T result = partial[0];
    for (int w = 1; w < (int)blockDim.x / 32; w++) result = op(result, partial[w]);
    __syncthreads();  // partial may be reused right away
    return result;
}

// The row's maximum and sum of exp(x - max).
__device__ void softmax_stats(const float* x, int K, float* partial, float* max_out, float* sum_out) {
    float m = -INFINITY;
    for (int j = threadIdx.x; j < K; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_reduce(m, partial, MaxOp());
    float s = 0.0f;
    for (int j = threadIdx.x; j < K; j += blockDim.x) s += expf(x[j] - m);
    *max_out = m;
    *sum_out = block_reduce(s, partial, SumOp());
}

__global__ void softmax_forward_kernel(float* __restrict__ probs, const float* __restrict__ logits, int K) {
    SHARED(float, partial, [32]);
    const float* x = logits + (long)blockIdx.x * K;
    float m, s;
    softmax_stats(x, K, partial, &m, &s);
    for (int j = threadIdx.x; j < K; j += blockDim.x) probs[(long)blockIdx.x * K + j] = expf(x[j] - m) / s;
}

// A label outside [0, K) (the C API rejects those) gives a NaN loss and counts as wrong.
__global__ void softmax_cross_entropy_kernel(float* __restrict__ losses, float* __restrict__ dlogits,
                                             int* __restrict__ correct, const float* __restrict__ logits,
                                             const int* __restrict__ labels, int N, int K) {
    SHARED(float, partial, [32]);
    SHARED(int, counts, [32]);
    const float* x = logits + (long)blockIdx.x * K;
    int label = labels[blockIdx.x];
    bool valid = label >= 0 && label < K;
    float m, s;
    softmax_stats(x, K, partial, &m, &s);
    float target = valid ? x[label] : NAN;
    int above = 0, nans = 0;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
        above += x[j] > target || (x[j] == target && j < label);
        nans += isnan(x[j]);
        if (dlogits) dlogits[(long)blockIdx.x * K + j] = (expf(x[j] - m) / s - (j == label ? 1.0f : 0.0f)) / N;
    }
    int rank = block_reduce(above, counts, SumOp());
    nans = block_reduce(nans, counts, SumOp());
    if (threadIdx.x == 0) {
        losses[blockIdx.x] = logf(s) + m - target;
        if (correct && valid && nans == 0) {  // integer atomics: exact and order-independent
            atomicAdd(&correct[0], rank < 1 ? 1 : 0);
            atomicAdd(&correct[1], rank < 5 ? 1 : 0);
        }
    }
}

static void softmax_check(int N, int K) {
    require(N > 0 && K > 0, "softmax: need a positive batch and class count (N=%d K=%d)", N, K);
    require((long)N * K <= INT32_MAX, "softmax: too many logits");
}

void softmax_cross_entropy(float* losses, float* dlogits, int* correct, const float* logits,
                           const int* labels, int N, int K, cudaStream_t stream) {
    softmax_check(N, K);
    if (correct) cudaCheck(cudaMemsetAsync(correct, 0, 2 * sizeof(int), stream));
    LAUNCH(softmax_cross_entropy_kernel, N, SOFTMAX_THREADS, 0, stream, losses, dlogits, correct, logits, labels, N, K);
}

void softmax_forward(float* probs, const float* logits, int N, int K, cudaStream_t stream) {
    softmax_check(N, K);
    LAUNCH(softmax_forward_kernel, N, SOFTMAX_THREADS, 0, stream, probs, logits, K);
}

// ----------------------------------------------------------------------------
// 10. SGD with momentum and weight decay
//
// The paper's update, fused into one pass over w, v and g (each read once, w and v
// written once: 20 bytes per parameter, ~1.2 GB per step at 61M parameters):
//   v <- momentum * v - weight_decay * lr * w - lr * g ;  w <- w + v
// The model passes weight_decay = 0 for biases. One thread per 4 parameters.

__global__ void sgd_update_kernel(float* __restrict__ w, float* __restrict__ v, const float* __restrict__ g,
                                  long n, float lr, float momentum, float decay) {
    long i = 4 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    float wi[4], vi[4], gi[4];
    load4(wi, w, i, n);
    load4(vi, v, i, n);
    load4(gi, g, i, n);
    for (int j = 0; j < 4; j++) {
        vi[j] = momentum * vi[j] - decay * wi[j] - lr * gi[j];
        wi[j] += vi[j];
    }
    store4(w, wi, i, n);
    store4(v, vi, i, n);
}

void sgd_update(float* w, float* v, const float* g, long n, float lr, float momentum,
                float weight_decay, cudaStream_t stream) {
    elementwise_check("sgd_update", n);
    require(isfinite(lr) && isfinite(momentum) && isfinite(weight_decay),
            "sgd_update: lr, momentum and weight decay must be finite");
    LAUNCH(sgd_update_kernel, elementwise_blocks(n), ELEMENTWISE_THREADS, 0, stream, w, v, g, n, lr, momentum,
           weight_decay * lr);
}

// ----------------------------------------------------------------------------
// 11. The two-tower model
//
// The paper splits the network over two GPUs: each "tower" holds half of every layer's
// filters, with its parameters, gradients, momentum and activations on its own device.
// The towers meet only at the inputs of conv3, fc6, fc7 and fc8, where each tower reads
// the outputs of both; everywhere else a tower reads only its own half (as one network:
// conv2, conv4 and conv5 are grouped convolutions with 2 groups, LRN never crosses towers).
//
// An exchange is a peer copy of the other tower's tensor followed by a concatenation along
// features, tower 0 first, so that every compute kernel reads one contiguous input. The
// backward pass runs it in reverse: the gradient of a concatenated input is split, the
// part that belongs to the other tower is sent to it, and each tower sums the two
// contributions to its own output (a + b in float is commutative: the sum does not depend
// on which device does it, so one device and two give the same bits).

// concat_features: out[n][0:wa] = a[n][:], out[n][wa:wa+wb] = b[n][:], for n < N.
// One thread per output element: consecutive threads write consecutive floats and read
// consecutive floats of a or b (one tensor switch per row), so both sides are coalesced.
__global__ void concat_features_kernel(float* __restrict__ out, const float* __restrict__ a,
                                       const float* __restrict__ b, int N, int wa, int wb) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long w = wa + wb;
    if (i >= N * w) return;
    long n = i / w, j = i % w;
    out[i] = j < wa ? a[n * wa + j] : b[n * wb + (j - wa)];
}

void concat_features(float* out, const float* a, const float* b, int N, int wa, int wb,
                     cudaStream_t stream) {
    const int threads = 256;
    LAUNCH(concat_features_kernel, ceil_div((long)N * (wa + wb), threads), threads, 0, stream,
           out, a, b, N, wa, wb);
}

// split_features: out[n][j] = cat[n][offset + j] (+ add[n][j] when add is not NULL),
// for j < width; cat rows hold w floats. Same thread mapping as concat_features.
__global__ void split_features_kernel(float* __restrict__ out, const float* __restrict__ cat,
                                      const float* __restrict__ add, int N, int w, int offset,
                                      int width) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)N * width) return;
    long n = i / width, j = i % width;
    float v = cat[n * w + offset + j];
    out[i] = add ? v + add[i] : v;
}

void split_features(float* out, const float* cat, const float* add, int N, int w, int offset,
                    int width, cudaStream_t stream) {
    const int threads = 256;
    LAUNCH(split_features_kernel, ceil_div((long)N * width, threads), threads, 0, stream,
           out, cat, add, N, w, offset, width);
}

// --- the architecture

enum { NUM_CONV = 5, NUM_FC = 3, NUM_LAYERS = NUM_CONV + NUM_FC, NUM_TOWERS = 2 };
static const char* LAYER_NAMES[NUM_LAYERS] = {"conv1", "conv2", "conv3", "conv4",
                                              "conv5", "fc6",   "fc7",   "fc8"};

// A preset: sizes are for the whole network (both towers). The topology is fixed:
// conv1 ReLU LRN pool, conv2 ReLU LRN pool, conv3 ReLU, conv4 ReLU, conv5 ReLU pool,
// fc6 ReLU dropout, fc7 ReLU dropout, fc8 softmax; the towers meet at conv3, fc6, fc7, fc8.
// The authors' 2012 code differs in two places, each a field: conv1's ReLU comes after the
// pooling (conv1 LRN pool ReLU), and conv2's LRN is followed by a within-map normalisation.
struct Arch {
    int preset;                 // index into PRESETS
    int crop;                   // the network's square input, cropped from the stored image
    int classes;                // fc8 outputs: from the dataset
    int conv_out[NUM_CONV], conv_kernel[NUM_CONV], conv_stride[NUM_CONV], conv_pad[NUM_CONV];
    int fc_out[2];              // fc6, fc7
    int pool_size, pool_stride; // overlapping max pooling
    int lrn_size;
    float lrn_alpha, lrn_beta, lrn_k;
    float init_std;             // weights ~ N(0, (init_std * Recipe::init_std_scale[layer])^2)
    bool conv1_relu_after_pool; // conv1 LRN pool ReLU instead of conv1 ReLU LRN pool
    int spatial_size;           // conv2's within-map normalisation after its LRN (0: none)
    float spatial_alpha, spatial_beta, spatial_k;
};

// "alexnet": the paper's network (Krizhevsky et al. 2012, section 3). "small": the same topology for 32x32 images with
// 28x28 crops (28 -> conv1 28 -> pool 13 -> conv2 13 -> pool 6 -> conv3..5 6 -> pool 2),
// used by the tests and the CPU demo. LRN k=2, n=5, alpha=1e-4 (divided by n), beta=0.75.
// "alexnet-2012-code": the network of the authors' own 2012 run behind the paper's
// numbers (doc/alexnet-2012-code.md): the paper's sizes, conv1 LRN pool ReLU, and a 5x5
// within-map normalisation (alpha 1e-3 divided by 25, beta 0.75, k 1) after conv2's LRN.
static const char* PRESET_NAMES[] = {"alexnet", "small", "alexnet-2012-code"};
static const Arch PRESETS[] = {
    {0, 224, 1000, {96, 256, 384, 384, 256}, {11, 5, 3, 3, 3}, {4, 1, 1, 1, 1}, {0, 2, 1, 1, 1},
     {4096, 4096}, 3, 2, 5, 1e-4f, 0.75f, 2.0f, 0.01f, false, 0, 0.0f, 0.0f, 0.0f},
    {1, 28, 10, {16, 32, 48, 48, 32}, {5, 5, 3, 3, 3}, {1, 1, 1, 1, 1}, {2, 2, 1, 1, 1},
     {128, 128}, 3, 2, 5, 1e-4f, 0.75f, 2.0f, 0.05f, false, 0, 0.0f, 0.0f, 0.0f},
    {2, 224, 1000, {96, 256, 384, 384, 256}, {11, 5, 3, 3, 3}, {4, 1, 1, 1, 1}, {0, 2, 1, 1, 1},
     {4096, 4096}, 3, 2, 5, 1e-4f, 0.75f, 2.0f, 0.01f, true, 5, 1e-3f, 0.75f, 1.0f},
};
enum { NUM_PRESETS = sizeof(PRESETS) / sizeof(PRESETS[0]) };

static Arch find_preset(const char* name) {
    for (int i = 0; i < NUM_PRESETS; i++)
        if (strcmp(name, PRESET_NAMES[i]) == 0) return PRESETS[i];
    fail("unknown preset '%s' (known: alexnet, small, alexnet-2012-code)", name);
}

// How a preset is trained, beyond the flags. The paper's text gives one recipe; the
// authors' 2012 run (doc/alexnet-2012-code.md, note 5) used another, epochs counted from 0:
struct Recipe {
    float init_std_scale[NUM_LAYERS];  // each layer's init std, in units of Arch::init_std
    const char* flag_defaults[4];      // flag, value pairs the preset sets unless the command line does
    int crop_chunk;         // consecutive images of a batch that share one crop and one mirror
    bool centre_mean;       // subtract the mean image's centre crop, not the mean under the crop
    bool lighting_stdev;    // colour noise 0.1 z_i sqrt(lambda_i) p_i, then the crop / 1.1
    int lighting_epochs;    // epochs with colour noise (0: all)
    float bias_lr_scale;    // biases: this times --lr, never lowered (0: the weights' rate)
    int conv1_slow_epoch;   // from this epoch conv1's weights learn at a tenth of the others' rate (-1: never)
    int conv1_frozen_epoch; // from this epoch conv1 is not updated at all (-1: never)
};
static const Recipe RECIPES[NUM_PRESETS] = {
    // alexnet and small: the paper's text (the schedule comes from the flags)
    {{1, 1, 1, 1, 1, 1, 1, 1}, {}, 1, false, false, 0, 0.0f, -1, -1},
    {{1, 1, 1, 1, 1, 1, 1, 1}, {}, 1, false, false, 0, 0.0f, -1, -1},
    // alexnet-2012-code: std 0.03 in conv3..5; the weights' rate drops at the run's epochs
    // 25, 51 and 79; chunks of 32; colour noise and conv1's slowing at the run's epoch 67,
    // conv1 frozen at its epoch 72; biases at 0.02 for --lr 0.01
    {{1, 1, 3, 3, 3, 1, 1, 1}, {"--lr-steps", "24,50,78", "--patience", "0"}, 32, true, true, 66, 2.0f, 66, 71},
};
static const Recipe& recipe_of(const Arch& a) { return RECIPES[a.preset]; }

// The paper initialises biases to 1 in conv2, conv4, conv5, fc6 and fc7 so that the
// ReLUs start in their linear part, and to 0 in conv1, conv3 and fc8.
static const float BIAS_INIT[NUM_LAYERS] = {0, 1, 0, 1, 1, 1, 1, 0};

// One layer as one tower computes it. Conv: input C x H x W, output K x OH x OW.
// Fully connected: C = input features, H = W = R = 1, OH = OW = 1.
struct LayerShape {
    int C, H, W, K, OH, OW, R, stride, pad;
    long weights() const { return (long)K * C * R * R; }
    long in_size() const { return (long)C * H * W; }    // per image
    long out_size() const { return (long)K * OH * OW; } // per image
};

// cuda-convnet sizes a conv output as 1 + ceil((2 pad + in - k) / stride): conv1 of the
// paper reads past the bottom/right edge (224 -> 55). Pooling uses only whole windows.
static int conv_out_size(int in, int k, int stride, int pad) {
    return 1 + ceil_div(2 * pad + in - k, stride);
}
static int pool_out_size(const Arch& a, int in) { return (in - a.pool_size) / a.pool_stride + 1; }

// Output rows [0, K/2) of every layer belong to tower 0, the rest to tower 1.
static int tower_share(int K, int tower) { return tower == 0 ? K / 2 : K - K / 2; }

static void validate_arch(const Arch& a) {
    require(a.preset >= 0 && a.preset < NUM_PRESETS, "unknown preset number %d", a.preset);
    require(a.classes >= 2, "need at least 2 classes, got %d", a.classes);
    for (int l = 0; l < NUM_CONV; l++)
        require(a.conv_out[l] > 0 && a.conv_out[l] % 2 == 0 && a.conv_kernel[l] > 0 &&
                    a.conv_stride[l] > 0 && a.conv_pad[l] >= 0 && a.conv_pad[l] < a.conv_kernel[l],
                "bad geometry for %s", LAYER_NAMES[l]);
    require(a.fc_out[0] > 0 && a.fc_out[0] % 2 == 0 && a.fc_out[1] > 0 && a.fc_out[1] % 2 == 0,
            "fc6 and fc7 widths must be positive and even");
    require(a.pool_size > 0 && a.pool_stride > 0 && a.lrn_size > 0 && a.init_std > 0,
            "bad pooling, LRN or init settings");
    require(a.spatial_size == 0 || (a.spatial_size >= 1 && a.spatial_size <= 64 && a.spatial_k > 0 &&
                                    a.spatial_alpha >= 0 && std::isfinite(a.spatial_alpha) &&
                                    std::isfinite(a.spatial_beta) && std::isfinite(a.spatial_k)),
            "bad within-map normalisation settings (size %d)", a.spatial_size);
}

// The shapes of every layer for one tower. Throws when the input is too small.
static void tower_shapes(const Arch& a, int tower, LayerShape s[NUM_LAYERS]) {
    validate_arch(a);
    // conv1 and conv3 read both towers' channels (conv1: the whole image).
    const int conv_in[NUM_CONV] = {3, a.conv_out[0] / 2, a.conv_out[1], a.conv_out[2] / 2,
                                   a.conv_out[3] / 2};
    const bool pooled[NUM_CONV] = {true, true, false, false, true};
    int size = a.crop;
    for (int l = 0; l < NUM_CONV; l++) {
        LayerShape& c = s[l];
        c.C = conv_in[l];
        c.H = c.W = size;
        c.K = a.conv_out[l] / 2;
        c.R = a.conv_kernel[l];
        c.stride = a.conv_stride[l];
        c.pad = a.conv_pad[l];
        c.OH = c.OW = conv_out_size(size, c.R, c.stride, c.pad);
        require(c.OH >= 1, "%s: a %dx%d input is too small for a %dx%d kernel", LAYER_NAMES[l],
                size, size, c.R, c.R);
        size = c.OH;
        if (pooled[l]) {
            require(size >= a.pool_size, "%s: output %d is smaller than the pooling window",
                    LAYER_NAMES[l], size);
            size = pool_out_size(a, size);
        }
    }
    const int fc_in[NUM_FC] = {a.conv_out[4] * size * size, a.fc_out[0], a.fc_out[1]};
    const int fc_out[NUM_FC] = {a.fc_out[0] / 2, a.fc_out[1] / 2, tower_share(a.classes, tower)};
    for (int f = 0; f < NUM_FC; f++)
        s[NUM_CONV + f] = LayerShape{fc_in[f], 1, 1, fc_out[f], 1, 1, 1, 1, 0};
}

// The first value of a whole-network vector in checkpoint order (parameters or momentum)
// that is not finite, named as in alexnet.py ("fc7.weight[12] is nan"); "" when all are
// finite. One NaN or Inf spreads through every later step, so no checkpoint may hold one.
static std::string first_non_finite(const Arch& a, const float* v) {
    LayerShape s[NUM_TOWERS][NUM_LAYERS];
    for (int t = 0; t < NUM_TOWERS; t++) tower_shapes(a, t, s[t]);
    long pos = 0;
    for (int l = 0; l < NUM_LAYERS; l++)
        for (int part = 0; part < 2; part++) {  // as Model::transfer: weights, then biases
            const long count = part == 0 ? s[0][l].weights() + s[1][l].weights() : (long)s[0][l].K + s[1][l].K;
            for (long i = 0; i < count; i++)
                if (!std::isfinite(v[pos + i])) {
                    char text[96];
                    snprintf(text, sizeof(text), "%s.%s[%ld] is %g", LAYER_NAMES[l], part == 0 ? "weight" : "bias",
                             i, v[pos + i]);
                    return text;
                }
            pos += count;
        }
    return "";
}

// Number of parameters of the whole network.
static long arch_parameters(const Arch& a) {
    long total = 0;
    for (int t = 0; t < NUM_TOWERS; t++) {
        LayerShape s[NUM_LAYERS];
        tower_shapes(a, t, s);
        for (int l = 0; l < NUM_LAYERS; l++) total += s[l].weights() + s[l].K;
    }
    return total;
}

// --- host random numbers: splitmix64 streams keyed by (seed, purpose, index), so every
// random choice of the run (init, shuffles, crops, flips, lighting) is a function of the
// seed and the step: resuming needs no generator state.

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

enum RngPurpose { RNG_INIT = 1, RNG_SHUFFLE = 2, RNG_AUGMENT = 3 };

struct HostRng {
    uint64_t state;
    HostRng(uint64_t seed, uint64_t purpose, uint64_t index)
        : state(splitmix64(splitmix64(splitmix64(seed) ^ purpose) ^ index)) {}
    uint64_t next() { return splitmix64(state++); }
    double uniform() { return (next() >> 11) * 0x1p-53; }                    // [0, 1)
    long below(long n) { return (long)(uniform() * n); }                     // [0, n)
    double normal() {                                                        // Box-Muller
        double u = 1.0 - uniform(), v = uniform();
        return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
    }
};

// --- the model

// The inputs of one step on the host: the staging buffers of the data loader.
struct Batch {
    int n = 0;             // images in this batch (<= the model's capacity)
    uint8_t* images;       // [n][H][W][3]
    int* labels;           // [n]
    int* offsets;          // [n][2] crop (y, x)
    uint8_t* flips;        // [n]
    float* alphas;         // [n][3] PCA lighting
    float divisor = 1.0f;  // every crop divided by this (the 2012 code's colour noise)
};

// Where the towers meet: the inputs of conv3, fc6, fc7 and fc8, which read both towers'
// outputs, and the logits, which tower 0 gathers for the softmax. Each meeting has its
// own buffers and events (one pair forward, one backward), so no exchange waits on another.
enum { AT_CONV3, AT_FC6, AT_FC7, AT_FC8, AT_LOGITS, NUM_MEETINGS };
static int backward_event(int at) { return NUM_MEETINGS + at; }

// One meeting, in one tower. Forward: `own` (this tower's output, [N, width_t]) goes to
// the other tower's `recv`, and `cat` = [tower 0's | tower 1's], the next layer's input.
// Backward: `dcat` (the gradient at cat) is split; the other tower's part leaves through
// `send` into the other's `recvg`, and `down`, the gradient at own, is the sum of this
// tower's part and recvg.
struct Meeting {
    float* own;    // [N, width_t]
    float* recv;   // [N, width_o]
    float* cat;    // [N, width_0 + width_1]
    float* dcat;   // [N, width_0 + width_1]
    float* send;   // [N, width_o]
    float* recvg;  // [N, width_t]
    float* down;   // [N, width_t]
};

// conv1 and conv2 with what follows them: ReLU (fused into the conv), LRN, max pooling.
// Shapes for the alexnet preset, one tower: conv1 [N, 48, 55, 55] pooled to 27x27,
// conv2 [N, 128, 27, 27] pooled to 13x13. The 2012 code's variants: conv1's ReLU after
// the pooling (relu_after_pool), conv2's within-map normalisation between LRN and pooling.
struct NormPoolLayer {
    bool relu_after_pool;
    float* out;         // conv (+ ReLU unless relu_after_pool)      [N, K, OH, OW]
    float* scale;       // LRN denominators                          [N, K, OH, OW]
    float* lrn;         // LRN output                                [N, K, OH, OW]
    float* spatial_scale;  // within-map denominators (NULL: none)   [N, K, OH, OW]
    float* spatial;     // within-map normalisation output           [N, K, OH, OW]
    float* pool;        // max pooled (+ ReLU if relu_after_pool)    [N, K, P, P]
    float *dout, *dlrn, *dspatial, *dpool;  // gradients at out, lrn, spatial and pool
};

// fc6 and fc7: ReLU (fused), then dropout. alexnet: [N, 2048] per tower.
struct FcLayer {
    float* out;         // fc + ReLU            [N, K]
    float* dropped;     // after dropout        [N, K]
    float* dout;        // gradient at out
};

// Dropout layer numbers for the shared Philox rule: fc6 of tower t is layer t, fc7 is 2 + t.
static uint32_t dropout_layer(int fc, int tower) { return 2 * fc + tower; }

struct DeviceBatch {  // one batch of stored images and its augmentation, on a device
    uint8_t* images;      // [n][H][W][3]
    int* offsets;         // [n][2] crop corner
    uint8_t* flips;       // [n]
    float* alphas;        // [n][3] PCA lighting
    int* labels;          // [n]
    float divisor;        // Batch::divisor (a kernel argument, kept on the host)
};

struct Tower {
    int device;
    cudaStream_t stream;      // compute
    cudaStream_t copy_stream; // outgoing peer copies
    cudaEvent_t ready[2 * NUM_MEETINGS], sent[2 * NUM_MEETINGS];  // forward, then backward
    LayerShape shape[NUM_LAYERS];
    long num_params = 0;
    // One buffer each: all weights (layer order), then all biases, so that the update is
    // two launches (weight decay on the weights only).
    float *params, *grads, *momentum;
    long weight_offset[NUM_LAYERS], bias_offset[NUM_LAYERS];
    // The activations of one batch, layer by layer (shapes: alexnet, one tower), each with
    // its gradient (d...): conv3..conv5 and fc8 read the meetings' `cat`.
    float* x;                      // the augmented crops   [N, 3, 224, 224]
    NormPoolLayer conv1, conv2;
    float *conv3, *conv4, *conv5;  // conv + ReLU           [N, 192, 13, 13] x2, [N, 128, 13, 13]
    float* pool5;                  // max pooled            [N, 128, 6, 6]
    float *dconv3, *dconv4, *dconv5;
    FcLayer fc6, fc7;
    float* logits;                 // fc8                   [N, classes / 2]
    Meeting meet[NUM_MEETINGS];    // AT_LOGITS: tower 0 gathers, tower 1 only sends
    Workspace workspace;  // partial sums of split matrix products
    // tower 0 only: the loss of every image and the top-1/top-5 counts
    float* losses;
    int* correct;
    // The input batch, uploaded and augmented once per device: a tower on the same device
    // as tower 0 reads tower 0's x (shares_input). While a training step computes, the
    // next batch is uploaded into `staged` on upload_stream; the next step swaps it in.
    bool shares_input = false;
    DeviceBatch input, staged;  // labels: tower 0 only
    cudaStream_t upload_stream;
    cudaEvent_t augmented, uploaded, input_free;  // x written; host batch read; done with x (tower 1)
    float *mean, *eigval, *eigvec;
    std::vector<void*> allocations;

    void alloc_batch(DeviceBatch& b, long N, long pixels, bool labels) {
        b.images = alloc<uint8_t>(N * pixels);
        b.offsets = alloc<int>(2 * N);
        b.flips = alloc<uint8_t>(N);
        b.alphas = alloc<float>(3 * N);
        b.labels = labels ? alloc<int>(N) : nullptr;
    }
    float* weight(int l) { return params + weight_offset[l]; }
    float* bias(int l) { return params + bias_offset[l]; }
    float* dweight(int l) { return grads + weight_offset[l]; }
    float* dbias(int l) { return grads + bias_offset[l]; }
    template <typename T>
    T* alloc(long count) {
        void* p = nullptr;
        cudaCheck(cudaMalloc(&p, (size_t)count * sizeof(T)));
        allocations.push_back(p);
        return (T*)p;
    }
};

// The learning rates of one step (Model::update).
struct Rates {
    float weights, biases, conv1_weights, conv1_biases;
    bool conv1_frozen;
};

// The last step's results, on the host.
struct StepResult {
    double loss = 0;        // mean over the batch
    long top1 = 0, top5 = 0; // correct predictions
};

struct Model {
    Arch arch;
    int capacity, image_h, image_w;
    float dropout;
    Precision precision;         // of the matrix products (--precision)
    int staged_n = 0;            // images in the staged batch (0: none)
    Tower towers[NUM_TOWERS]{};  // value-initialised: unused buffers are NULL
    std::vector<float> host_losses;

    Model(const Arch& a, int batch, int H, int W, float dropout_p, Precision precision_,
          const int devices[NUM_TOWERS])
        : arch(a), capacity(batch), image_h(H), image_w(W), dropout(dropout_p), precision(precision_) {
        require(batch >= 1, "batch size must be at least 1");
        require(a.crop <= H && a.crop <= W, "the %s preset crops %dx%d, larger than the %dx%d images",
                PRESET_NAMES[a.preset], a.crop, a.crop, H, W);
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            T.device = devices[t];
            tower_shapes(a, t, T.shape);
        }
        for (int t = 0; t < NUM_TOWERS; t++) {
            if (devices[t] != devices[1 - t]) enable_peer_access(devices[t], devices[1 - t]);
            allocate(t);
        }
        host_losses.resize(batch);
    }
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    ~Model() {
        for (Tower& T : towers) {
            cudaSetDevice(T.device);
            for (void* p : T.allocations) cudaFree(p);
            for (int e = 0; e < 2 * NUM_MEETINGS; e++) {
                cudaEventDestroy(T.ready[e]);
                cudaEventDestroy(T.sent[e]);
            }
            cudaEventDestroy(T.augmented);
            cudaEventDestroy(T.uploaded);
            cudaEventDestroy(T.input_free);
            cudaStreamDestroy(T.upload_stream);
            cudaStreamDestroy(T.stream);
            cudaStreamDestroy(T.copy_stream);
        }
    }

    static void enable_peer_access(int device, int peer) {
        int can = 0;
        cudaCheck(cudaDeviceCanAccessPeer(&can, device, peer));
        if (!can) return;  // peer copies still work, staged through the host
        cudaCheck(cudaSetDevice(device));
        cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
        else cudaCheck(err);
    }

    void allocate(int t) {
        Tower& T = towers[t];
        const LayerShape* s = T.shape;
        const LayerShape* o = towers[1 - t].shape;
        cudaCheck(cudaSetDevice(T.device));
        cudaCheck(cudaStreamCreate(&T.stream));
        cudaCheck(cudaStreamCreate(&T.copy_stream));
        for (int e = 0; e < 2 * NUM_MEETINGS; e++) {
            cudaCheck(cudaEventCreate(&T.ready[e]));
            cudaCheck(cudaEventCreate(&T.sent[e]));
        }
        cudaCheck(cudaStreamCreate(&T.upload_stream));
        for (cudaEvent_t* e : {&T.augmented, &T.uploaded, &T.input_free})
            cudaCheck(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
        T.shares_input = t > 0 && T.device == towers[0].device;
        long offset = 0;
        for (int l = 0; l < NUM_LAYERS; l++) T.weight_offset[l] = offset, offset += s[l].weights();
        for (int l = 0; l < NUM_LAYERS; l++) T.bias_offset[l] = offset, offset += s[l].K;
        T.num_params = offset;
        T.params = T.alloc<float>(offset);
        T.grads = T.alloc<float>(offset);
        T.momentum = T.alloc<float>(offset);

        const long N = capacity;
        T.x = T.shares_input ? towers[0].x : T.alloc<float>(N * s[0].in_size());
        for (int l = 0; l < 2; l++) {
            NormPoolLayer& c = l == 0 ? T.conv1 : T.conv2;
            const long size = N * s[l].out_size();
            c.relu_after_pool = l == 0 && arch.conv1_relu_after_pool;
            c.out = T.alloc<float>(size), c.scale = T.alloc<float>(size), c.lrn = T.alloc<float>(size);
            c.dout = T.alloc<float>(size), c.dlrn = T.alloc<float>(size);
            if (l == 1 && arch.spatial_size > 0) {
                c.spatial_scale = T.alloc<float>(size), c.spatial = T.alloc<float>(size);
                c.dspatial = T.alloc<float>(size);
            }
        }
        T.conv1.pool = T.alloc<float>(N * s[1].in_size()), T.conv1.dpool = T.alloc<float>(N * s[1].in_size());
        T.conv3 = T.alloc<float>(N * s[2].out_size()), T.dconv3 = T.alloc<float>(N * s[2].out_size());
        T.conv4 = T.alloc<float>(N * s[3].out_size()), T.dconv4 = T.alloc<float>(N * s[3].out_size());
        T.conv5 = T.alloc<float>(N * s[4].out_size()), T.dconv5 = T.alloc<float>(N * s[4].out_size());
        for (int f = 0; f < 2; f++) {
            FcLayer& fc = f == 0 ? T.fc6 : T.fc7;
            const long size = N * s[NUM_CONV + f].K;
            fc.out = T.alloc<float>(size), fc.dropped = T.alloc<float>(size), fc.dout = T.alloc<float>(size);
        }
        T.logits = T.alloc<float>(N * s[7].K);
        // The meetings: own / down are [N, own width], recv / send the other tower's width;
        // own is the layer output that meets (conv2's pool, pool5, fc6's and fc7's dropout).
        // Only tower 0 receives the logits.
        const long own[NUM_MEETINGS] = {N * s[2].in_size() / 2, N * s[5].in_size() / 2, N * s[5].K, N * s[6].K,
                                        N * s[7].K};
        const long other[NUM_MEETINGS] = {N * o[2].in_size() / 2, N * o[5].in_size() / 2, N * o[5].K, N * o[6].K,
                                          N * o[7].K};
        float* const outputs[NUM_MEETINGS] = {nullptr, nullptr, T.fc6.dropped, T.fc7.dropped, T.logits};
        for (int at = 0; at < NUM_MEETINGS; at++) {
            Meeting& m = T.meet[at];
            const bool receives = at != AT_LOGITS || t == 0;
            m.own = outputs[at] ? outputs[at] : T.alloc<float>(own[at]);
            m.down = T.alloc<float>(own[at]);
            if (receives) {  // a receiving tower also holds dcat and sends the other tower's part
                m.recv = T.alloc<float>(other[at]), m.send = T.alloc<float>(other[at]);
                m.recvg = T.alloc<float>(own[at]);
                m.cat = T.alloc<float>(own[at] + other[at]), m.dcat = T.alloc<float>(own[at] + other[at]);
            }
        }
        T.conv2.pool = T.meet[AT_CONV3].own, T.conv2.dpool = T.meet[AT_CONV3].down;
        T.pool5 = T.meet[AT_FC6].own;
        size_t workspace = 1;
        for (int l = 0; l < NUM_LAYERS; l++) workspace = std::max(workspace, layer_workspace(s[l], l, capacity));
        T.workspace = Workspace{T.alloc<float>(workspace), workspace};

        const long pixels = (long)image_h * image_w * 3;
        if (!T.shares_input) {
            T.alloc_batch(T.input, N, pixels, t == 0);
            T.alloc_batch(T.staged, N, pixels, t == 0);
        }
        T.mean = T.alloc<float>(pixels);
        T.eigval = T.alloc<float>(3);
        T.eigvec = T.alloc<float>(9);
        if (t == 0) {
            T.losses = T.alloc<float>(N);
            T.correct = T.alloc<int>(2);
        }
    }

    static size_t layer_workspace(const LayerShape& c, int l, int N) {
        if (l >= NUM_CONV) return fc_workspace(N, c.C, c.K);
        return conv_workspace(N, c.C, c.H, c.W, c.K, c.R, c.R, c.stride, c.pad, 1, c.OH, c.OW);
    }

    // The mean image and the lighting's principal axes: eigvec's columns, each scaled by
    // its eigenvalue (the paper's formula on 0..1 pixels) or by its square root, the
    // standard deviation along it (the 2012 code's).
    void set_statistics(const float* mean, const float* eigval_in, const float* eigvec) {
        float eigval[3];
        for (int i = 0; i < 3; i++)
            eigval[i] = recipe_of(arch).lighting_stdev ? sqrtf(std::max(eigval_in[i], 0.0f)) : eigval_in[i];
        for (Tower& T : towers) {
            cudaCheck(cudaSetDevice(T.device));
            cudaCheck(cudaMemcpy(T.mean, mean, (size_t)image_h * image_w * 3 * sizeof(float),
                                 cudaMemcpyHostToDevice));
            cudaCheck(cudaMemcpy(T.eigval, eigval, 3 * sizeof(float), cudaMemcpyHostToDevice));
            cudaCheck(cudaMemcpy(T.eigvec, eigvec, 9 * sizeof(float), cudaMemcpyHostToDevice));
        }
    }

    // --- parameters: the whole network on the host, in checkpoint order (per layer: the
    // weight with tower 0's output rows first, then the bias likewise) <-> the towers.

    long num_params() const { return towers[0].num_params + towers[1].num_params; }

    // Copy between a host vector in checkpoint order and each tower's parameters (or momentum).
    void transfer(float* host, bool momentum, bool upload) {
        long pos = 0;
        for (int l = 0; l < NUM_LAYERS; l++)
            for (int part = 0; part < 2; part++)  // 0: weights, 1: biases
                for (Tower& T : towers) {
                    long offset = part == 0 ? T.weight_offset[l] : T.bias_offset[l];
                    long count = part == 0 ? T.shape[l].weights() : T.shape[l].K;
                    float* dev = (momentum ? T.momentum : T.params) + offset;
                    cudaCheck(cudaSetDevice(T.device));
                    if (upload)
                        cudaCheck(cudaMemcpy(dev, host + pos, count * sizeof(float), cudaMemcpyHostToDevice));
                    else
                        cudaCheck(cudaMemcpy(host + pos, dev, count * sizeof(float), cudaMemcpyDeviceToHost));
                    pos += count;
                }
    }
    void upload_state(const float* params, const float* momentum) {
        transfer(const_cast<float*>(params), false, true);
        transfer(const_cast<float*>(momentum), true, true);
    }
    void download_state(float* params, float* momentum) {
        transfer(params, false, false);
        transfer(momentum, true, false);
    }

    // The paper's initialisation, drawn for the whole network so that it does not depend
    // on the split; momentum starts at 0.
    void init_params(uint64_t seed) {
        std::vector<float> params(num_params()), momentum(num_params(), 0.0f);
        HostRng rng(seed, RNG_INIT, 0);
        long pos = 0;
        for (int l = 0; l < NUM_LAYERS; l++) {
            long weights = towers[0].shape[l].weights() + towers[1].shape[l].weights();
            long biases = towers[0].shape[l].K + towers[1].shape[l].K;
            const double std = (double)arch.init_std * recipe_of(arch).init_std_scale[l];
            for (long i = 0; i < weights; i++) params[pos++] = (float)(std * rng.normal());
            for (long i = 0; i < biases; i++) params[pos++] = BIAS_INIT[l];
        }
        upload_state(params.data(), momentum.data());
    }

    // --- exchanges between the towers

    // Copy count floats from tower `from` to tower `to` as soon as `from`'s compute stream
    // has produced them; the copy runs on `from`'s copy stream, so it overlaps the compute
    // that follows. `to` waits for it in receive().
    void send(int event, int from, int to, float* dst, const float* src, long count) {
        Tower& F = towers[from];
        cudaCheck(cudaSetDevice(F.device));
        cudaCheck(cudaEventRecord(F.ready[event], F.stream));
        cudaCheck(cudaStreamWaitEvent(F.copy_stream, F.ready[event], 0));
        cudaCheck(cudaMemcpyPeerAsync(dst, towers[to].device, src, F.device, count * sizeof(float),
                                      F.copy_stream));
        cudaCheck(cudaEventRecord(F.sent[event], F.copy_stream));
    }
    void receive(int event, int to, int from) {
        cudaCheck(cudaSetDevice(towers[to].device));
        cudaCheck(cudaStreamWaitEvent(towers[to].stream, towers[from].sent[event], 0));
    }

    // Forward at a meeting: the towers in [0, receivers) get cat = [tower 0's own | tower
    // 1's own] (width[t] floats per image from tower t); recv holds the other tower's own.
    void gather(int at, int n, const int width[NUM_TOWERS], int receivers) {
        for (int t = 0; t < receivers; t++)
            send(at, 1 - t, t, towers[t].meet[at].recv, towers[1 - t].meet[at].own, (long)n * width[1 - t]);
        for (int t = 0; t < receivers; t++) {
            Tower& T = towers[t];
            const Meeting& m = T.meet[at];
            receive(at, t, 1 - t);
            concat_features(m.cat, t == 0 ? m.own : m.recv, t == 0 ? m.recv : m.own, n, width[0], width[1],
                            T.stream);
        }
    }

    // Backward of gather, in two halves so that compute can run between them. The towers
    // in [0, holders) hold dcat; every tower t gets down = the sum over holders of dcat's
    // part t. A holder splits off the other tower's part into send and ships it to the
    // other's recvg (or straight to its down when the other holds nothing to add it to).
    void scatter_send(int at, int n, const int width[NUM_TOWERS], int holders) {
        for (int t = 0; t < holders; t++) {
            Tower& T = towers[t];
            const Meeting& m = T.meet[at];
            const int o = 1 - t;
            cudaCheck(cudaSetDevice(T.device));
            split_features(m.send, m.dcat, nullptr, n, width[0] + width[1], o == 0 ? 0 : width[0], width[o],
                           T.stream);
            send(backward_event(at), t, o, o < holders ? towers[o].meet[at].recvg : towers[o].meet[at].down,
                 m.send, (long)n * width[o]);
        }
    }
    void scatter_finish(int at, int n, const int width[NUM_TOWERS], int holders) {
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            const Meeting& m = T.meet[at];
            if (1 - t < holders) receive(backward_event(at), t, 1 - t);
            cudaCheck(cudaSetDevice(T.device));
            if (t < holders)
                split_features(m.down, m.dcat, holders == NUM_TOWERS ? m.recvg : nullptr, n, width[0] + width[1],
                               t == 0 ? 0 : width[0], width[t], T.stream);
        }
    }

    // --- one step

    // Upload a batch to every tower and augment it into x (the crops) on each.
    // Batch b -> each device's input (on the compute streams) -> augmented into x. The
    // copies are asynchronous: the host batch must stay untouched until wait_staged().
    void load_batch(const Batch& b) {
        for (Tower& T : towers)
            if (!T.shares_input) {
                cudaCheck(cudaSetDevice(T.device));
                upload(T.input, b, T.stream);
                cudaCheck(cudaEventRecord(T.uploaded, T.stream));
            }
        augment(b.n);
    }

    // The next batch, uploaded on the upload streams while the queued step computes; the
    // host batch must stay untouched until wait_staged().
    void stage(const Batch& b) {
        for (Tower& T : towers)
            if (!T.shares_input) {
                cudaCheck(cudaSetDevice(T.device));
                cudaCheck(cudaStreamWaitEvent(T.upload_stream, T.augmented, 0));  // old contents read
                upload(T.staged, b, T.upload_stream);
                cudaCheck(cudaEventRecord(T.uploaded, T.upload_stream));
            }
        staged_n = b.n;
    }
    // The staged batch becomes the input, augmented into x; returns its size.
    int load_staged() {
        require(staged_n > 0, "load_staged: no batch was staged");
        for (Tower& T : towers)
            if (!T.shares_input) {
                cudaCheck(cudaSetDevice(T.device));
                cudaCheck(cudaStreamWaitEvent(T.stream, T.uploaded, 0));
                std::swap(T.input, T.staged);
            }
        int n = staged_n;
        staged_n = 0;
        augment(n);
        return n;
    }
    bool has_staged() const { return staged_n > 0; }
    // Waits until the last upload (staged or loaded) has read its host batch.
    void wait_staged() {
        for (Tower& T : towers)
            if (!T.shares_input) cudaCheck(cudaEventSynchronize(T.uploaded));
    }

    void upload(DeviceBatch& d, const Batch& b, cudaStream_t stream) {
        require(b.n >= 1 && b.n <= capacity, "batch of %d images for a model of %d", b.n, capacity);
        const long pixels = (long)image_h * image_w * 3;
        cudaCheck(cudaMemcpyAsync(d.images, b.images, b.n * pixels, cudaMemcpyHostToDevice, stream));
        cudaCheck(cudaMemcpyAsync(d.offsets, b.offsets, 2 * b.n * sizeof(int), cudaMemcpyHostToDevice, stream));
        cudaCheck(cudaMemcpyAsync(d.flips, b.flips, b.n, cudaMemcpyHostToDevice, stream));
        cudaCheck(cudaMemcpyAsync(d.alphas, b.alphas, 3 * b.n * sizeof(float), cudaMemcpyHostToDevice, stream));
        d.divisor = b.divisor;
        if (d.labels)
            cudaCheck(cudaMemcpyAsync(d.labels, b.labels, b.n * sizeof(int), cudaMemcpyHostToDevice, stream));
    }

    // Each device's input -> x. Tower 0 overwrites x only when a tower sharing it is done
    // with the last batch; that tower reads x once tower 0 has written it.
    void augment(int n) {
        Tower& T0 = towers[0];
        for (Tower& T : towers)
            if (T.shares_input) {
                cudaCheck(cudaSetDevice(T.device));
                cudaCheck(cudaEventRecord(T.input_free, T.stream));
                cudaCheck(cudaStreamWaitEvent(T0.stream, T.input_free, 0));
            }
        for (Tower& T : towers) {
            cudaCheck(cudaSetDevice(T.device));
            if (T.shares_input) {
                cudaCheck(cudaStreamWaitEvent(T.stream, T0.augmented, 0));
                continue;
            }
            const DeviceBatch& d = T.input;
            augment_images(T.x, d.images, T.mean, d.offsets, d.flips, d.alphas, T.eigval, T.eigvec, n,
                           image_h, image_w, arch.crop, recipe_of(arch).centre_mean, d.divisor, T.stream);
            cudaCheck(cudaEventRecord(T.augmented, T.stream));
        }
    }

    void conv(const LayerShape& c, float* out, const float* inp, const float* w,
              const float* b, int n, const Tower& T, bool relu = true) {
        conv_forward(out, inp, w, b, n, c.C, c.H, c.W, c.K, c.R, c.R, c.stride, c.pad, 1, c.OH,
                     c.OW, relu, T.workspace, precision, T.stream);
    }
    // What follows conv1 and conv2: LRN, the within-map normalisation where there is one,
    // pooling, and the ReLU where it comes after the pooling.
    void lrn_pool(const LayerShape& c, NormPoolLayer& L, int n, cudaStream_t stream) {
        lrn_forward(L.lrn, L.scale, L.out, n, c.K, c.OH, c.OW, arch.lrn_size, arch.lrn_alpha, arch.lrn_beta,
                    arch.lrn_k, stream);
        if (L.spatial)
            spatial_norm_forward(L.spatial, L.spatial_scale, L.lrn, n, c.K, c.OH, c.OW, arch.spatial_size,
                                 arch.spatial_alpha, arch.spatial_beta, arch.spatial_k, stream);
        pool(c, L.pool, L.spatial ? L.spatial : L.lrn, n, stream);
        if (L.relu_after_pool) relu_forward(L.pool, L.pool, pooled_size(c, n), stream);
    }
    long pooled_size(const LayerShape& c, int n) const {
        const long P = pool_out_size(arch, c.OH);
        return n * c.K * P * P;
    }
    void pool(const LayerShape& c, float* out, const float* inp, int n, cudaStream_t stream) {
        int P = pool_out_size(arch, c.OH);
        maxpool_forward(out, inp, n, c.K, c.OH, c.OW, arch.pool_size, arch.pool_stride, P, P, stream);
    }

    // Forward pass on the n images in x; leaves the loss, the gradient at the logits
    // (train) and the correct counts on tower 0. Dropout masks come from (seed, layer, step).
    void forward(int n, bool train, uint64_t seed, uint64_t step) {
        int width[NUM_TOWERS];
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            const LayerShape* s = T.shape;
            cudaCheck(cudaSetDevice(T.device));
            conv(s[0], T.conv1.out, T.x, T.weight(0), T.bias(0), n, T, !T.conv1.relu_after_pool);
            lrn_pool(s[0], T.conv1, n, T.stream);
            conv(s[1], T.conv2.out, T.conv1.pool, T.weight(1), T.bias(1), n, T);
            lrn_pool(s[1], T.conv2, n, T.stream);
            width[t] = (int)(s[2].in_size() / 2);
        }
        gather(AT_CONV3, n, width, NUM_TOWERS);
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            const LayerShape* s = T.shape;
            cudaCheck(cudaSetDevice(T.device));
            conv(s[2], T.conv3, T.meet[AT_CONV3].cat, T.weight(2), T.bias(2), n, T);
            conv(s[3], T.conv4, T.conv3, T.weight(3), T.bias(3), n, T);
            conv(s[4], T.conv5, T.conv4, T.weight(4), T.bias(4), n, T);
            pool(s[4], T.pool5, T.conv5, n, T.stream);
            width[t] = (int)(s[5].C / 2);
        }
        gather(AT_FC6, n, width, NUM_TOWERS);
        for (int f = 0; f < 2; f++) {  // fc6 reads the fc6 meeting, fc7 the fc7 meeting
            for (int t = 0; t < NUM_TOWERS; t++) {
                Tower& T = towers[t];
                const LayerShape& s = T.shape[NUM_CONV + f];
                FcLayer& fc = f == 0 ? T.fc6 : T.fc7;
                cudaCheck(cudaSetDevice(T.device));
                fc_forward(fc.out, T.meet[AT_FC6 + f].cat, T.weight(NUM_CONV + f), T.bias(NUM_CONV + f), n, s.C,
                           s.K, true, T.workspace, precision, T.stream);
                dropout_forward(fc.dropped, fc.out, (long)n * s.K, dropout, seed, dropout_layer(f, t), step, train,
                                T.stream);
                width[t] = s.K;
            }
            gather(AT_FC7 + f, n, width, NUM_TOWERS);
        }
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            const LayerShape& s = T.shape[7];
            cudaCheck(cudaSetDevice(T.device));
            fc_forward(T.logits, T.meet[AT_FC8].cat, T.weight(7), T.bias(7), n, s.C, s.K, false, T.workspace,
                       precision, T.stream);
            width[t] = s.K;
        }
        // tower 0 alone computes the softmax over both towers' logits
        gather(AT_LOGITS, n, width, 1);
        Tower& T0 = towers[0];
        const Meeting& logits = T0.meet[AT_LOGITS];
        cudaCheck(cudaSetDevice(T0.device));
        softmax_cross_entropy(T0.losses, train ? logits.dcat : nullptr, T0.correct, logits.cat, T0.input.labels,
                              n, arch.classes, T0.stream);
    }

    // Backward pass for the n images of the last forward(train = true): writes every
    // gradient. Each exchange sends the input gradient before the weight gradient is
    // computed, so the peer copies overlap with that compute.
    void backward(int n, uint64_t seed, uint64_t step) {
        int width[NUM_TOWERS];
        for (int t = 0; t < NUM_TOWERS; t++) width[t] = towers[t].shape[7].K;
        scatter_send(AT_LOGITS, n, width, 1);
        scatter_finish(AT_LOGITS, n, width, 1);
        fc_backward_layer(2, n);
        fc_undo_dropout_relu(1, n, seed, step);
        fc_backward_layer(1, n);
        fc_undo_dropout_relu(0, n, seed, step);
        fc_backward_layer(0, n);

        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            const LayerShape* s = T.shape;
            cudaCheck(cudaSetDevice(T.device));
            pool_backward(s[4], T.dconv5, T.meet[AT_FC6].down, T.conv5, n, T.stream);
            relu_backward(T.dconv5, T.dconv5, T.conv5, n * s[4].out_size(), T.stream);
            conv_backward(s[4], T.dconv4, T.dweight(4), T.dbias(4), T.dconv5, T.conv4, T.weight(4), n, T);
            relu_backward(T.dconv4, T.dconv4, T.conv4, n * s[3].out_size(), T.stream);
            conv_backward(s[3], T.dconv3, T.dweight(3), T.dbias(3), T.dconv4, T.conv3, T.weight(3), n, T);
            relu_backward(T.dconv3, T.dconv3, T.conv3, n * s[2].out_size(), T.stream);
            conv_backward(s[2], T.meet[AT_CONV3].dcat, nullptr, nullptr, T.dconv3, T.meet[AT_CONV3].cat,
                          T.weight(2), n, T);
            width[t] = (int)(s[2].in_size() / 2);
        }
        scatter_send(AT_CONV3, n, width, NUM_TOWERS);
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            cudaCheck(cudaSetDevice(T.device));
            conv_backward(T.shape[2], nullptr, T.dweight(2), T.dbias(2), T.dconv3, T.meet[AT_CONV3].cat,
                          T.weight(2), n, T);
        }
        scatter_finish(AT_CONV3, n, width, NUM_TOWERS);
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            const LayerShape* s = T.shape;
            cudaCheck(cudaSetDevice(T.device));
            lrn_pool_backward(s[1], T.conv2, n, T.stream);
            conv_backward(s[1], T.conv1.dpool, T.dweight(1), T.dbias(1), T.conv2.dout, T.conv1.pool, T.weight(1),
                          n, T);
            lrn_pool_backward(s[0], T.conv1, n, T.stream);
            conv_backward(s[0], nullptr, T.dweight(0), T.dbias(0), T.conv1.dout, T.x, T.weight(0), n, T);
        }
    }

    // Backward of fc6 (f = 0), fc7 or fc8 (f = 2) in every tower, with the exchange of the
    // gradient at its input: that meeting's `down` gets each tower's share, summed.
    void fc_backward_layer(int f, int n) {
        const int l = NUM_CONV + f, at = AT_FC6 + f;
        int width[NUM_TOWERS];
        auto dout = [&](Tower& T) { return f == 2 ? T.meet[AT_LOGITS].down : (f == 0 ? T.fc6 : T.fc7).dout; };
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            const LayerShape& s = T.shape[l];
            cudaCheck(cudaSetDevice(T.device));
            fc_backward_data(T.meet[at].dcat, dout(T), T.weight(l), n, s.C, s.K, T.workspace, precision, T.stream);
            width[t] = l == NUM_CONV ? (int)(s.C / 2) : T.shape[l - 1].K;
        }
        scatter_send(at, n, width, NUM_TOWERS);
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            const LayerShape& s = T.shape[l];
            cudaCheck(cudaSetDevice(T.device));
            fc_backward_weights(T.dweight(l), T.dbias(l), dout(T), T.meet[at].cat, n, s.C, s.K, T.workspace,
                                precision, T.stream);
        }
        scatter_finish(at, n, width, NUM_TOWERS);
    }

    // fc6's (f = 0) or fc7's dout, the gradient at its ReLU input, from the gradient at
    // its dropout output (the `down` of the meeting that output goes to).
    void fc_undo_dropout_relu(int f, int n, uint64_t seed, uint64_t step) {
        for (int t = 0; t < NUM_TOWERS; t++) {
            Tower& T = towers[t];
            FcLayer& fc = f == 0 ? T.fc6 : T.fc7;
            long count = (long)n * T.shape[NUM_CONV + f].K;
            cudaCheck(cudaSetDevice(T.device));
            dropout_backward(fc.dout, T.meet[AT_FC7 + f].down, count, dropout, seed, dropout_layer(f, t), step,
                             T.stream);
            relu_backward(fc.dout, fc.dout, fc.out, count, T.stream);
        }
    }

    // Conv backward: dinp (skipped when NULL) and/or dweight + dbias (skipped when NULL).
    void conv_backward(const LayerShape& c, float* dinp, float* dweight, float* dbias,
                       const float* dout, const float* inp, const float* weight, int n, Tower& T) {
        if (dinp)
            conv_backward_data(dinp, dout, weight, n, c.C, c.H, c.W, c.K, c.R, c.R, c.stride,
                               c.pad, 1, c.OH, c.OW, T.workspace, precision, T.stream);
        if (dweight)
            conv_backward_weights(dweight, dbias, dout, inp, n, c.C, c.H, c.W, c.K, c.R, c.R,
                                  c.stride, c.pad, 1, c.OH, c.OW, T.workspace, precision, T.stream);
    }
    void pool_backward(const LayerShape& c, float* dinp, const float* dout, const float* inp,
                       int n, cudaStream_t stream) {
        int P = pool_out_size(arch, c.OH);
        maxpool_backward(dinp, dout, inp, n, c.K, c.OH, c.OW, arch.pool_size, arch.pool_stride, P,
                         P, stream);
    }
    // From L.dpool, the gradient at the pool output, to L.dout, the gradient at the conv
    // output (ReLU undone), through L.dspatial and L.dlrn, the gradients at the within-map
    // normalisation's and the LRN's outputs.
    void lrn_pool_backward(const LayerShape& c, NormPoolLayer& L, int n, cudaStream_t stream) {
        if (L.relu_after_pool) relu_backward(L.dpool, L.dpool, L.pool, pooled_size(c, n), stream);
        pool_backward(c, L.spatial ? L.dspatial : L.dlrn, L.dpool, L.spatial ? L.spatial : L.lrn, n, stream);
        if (L.spatial)
            spatial_norm_backward(L.dlrn, L.dspatial, L.lrn, L.spatial, L.spatial_scale, n, c.K, c.OH, c.OW,
                                  arch.spatial_size, arch.spatial_alpha, arch.spatial_beta, arch.spatial_k, stream);
        lrn_backward(L.dout, L.dlrn, L.out, L.lrn, L.scale, n, c.K, c.OH, c.OW, arch.lrn_size, arch.lrn_alpha,
                     arch.lrn_beta, arch.lrn_k, stream);
        if (!L.relu_after_pool) relu_backward(L.dout, L.dout, L.out, n * c.out_size(), stream);
    }

    // SGD with momentum on every tower: weight decay on the weights, none on the biases.
    // Four parameter groups, each with its rate: conv1's weights, the other weights, conv1's
    // biases, the other biases (one buffer holds all weights, then all biases: each group is
    // one range). A frozen conv1 is not updated at all: with rate 0, momentum would still move it.
    void update(const Rates& r, float momentum, float weight_decay) {
        for (Tower& T : towers) {
            cudaCheck(cudaSetDevice(T.device));
            const long group[5] = {0, T.weight_offset[1], T.bias_offset[0], T.bias_offset[1], T.num_params};
            const float lr[4] = {r.conv1_weights, r.weights, r.conv1_biases, r.biases};
            for (int g = 0; g < 4; g++) {
                if (r.conv1_frozen && (g == 0 || g == 2)) continue;
                sgd_update(T.params + group[g], T.momentum + group[g], T.grads + group[g], group[g + 1] - group[g],
                           lr[g], momentum, g < 2 ? weight_decay : 0.0f, T.stream);
            }
        }
    }

    // Wait for both towers and return the loss and the correct counts of the last forward.
    StepResult finish(int n) {
        for (Tower& T : towers) {
            cudaCheck(cudaSetDevice(T.device));
            cudaCheck(cudaStreamSynchronize(T.copy_stream));
            cudaCheck(cudaStreamSynchronize(T.stream));
        }
        Tower& T0 = towers[0];
        int correct[2];
        cudaCheck(cudaSetDevice(T0.device));
        cudaCheck(cudaMemcpy(host_losses.data(), T0.losses, n * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(correct, T0.correct, sizeof(correct), cudaMemcpyDeviceToHost));
        StepResult r;
        for (int i = 0; i < n; i++) r.loss += host_losses[i];
        r.loss /= n;
        r.top1 = correct[0];
        r.top5 = correct[1];
        return r;
    }
};

// ----------------------------------------------------------------------------
// 12. Data loader
//
// The dataset folder written by `alexnet.py prepare` (doc/formats.md, "Dataset folder"):
// train_000.bin, train_001.bin, ... and val_000.bin, ...: int32 header[256] (magic
// 20121001, version 1, N, H, W, C = 3, classes), int32 labels[N], uint8 pixels[N][H][W][3];
// stats.bin: int32 header[256] (magic 20121002, version 1, H, W, C), float32 mean[H][W][3],
// eigval[3], eigvec[3][3]. Shards are memory-mapped: a batch copies its images out of the
// page cache, so the dataset never has to fit in memory.
//
// Training step s reads positions [(s mod E) B, (s mod E + 1) B) of epoch s / E's
// permutation (B the batch, E = floor(N / B) steps per epoch; the last partial batch of
// an epoch is dropped); the permutation, crops, flips and lighting all come from HostRng
// streams keyed by the seed and the epoch or step. The next batch is assembled on a
// background thread into pinned memory while the current step runs.

enum { DATA_MAGIC = 20121001, STATS_MAGIC = 20121002, HEADER_INTS = 256 };
// Plausible ranges of the header fields. Within them no size computed from a header
// can overflow (N < 2^31 images of at most 8192 x 8192 x 3 bytes: < 2^59).
enum { MAX_IMAGE_SIDE = 8192, MAX_CLASSES = 1000000 };

// A read-only memory map of a whole file.
// What a path is, when it is not a regular file.
static const char* file_kind(mode_t mode) {
    return S_ISDIR(mode) ? "a folder" : S_ISFIFO(mode) ? "a FIFO" : S_ISCHR(mode) ? "a character device"
         : S_ISBLK(mode) ? "a block device" : S_ISSOCK(mode) ? "a socket" : "not a regular file";
}

struct MappedFile {
    const uint8_t* data = nullptr;
    size_t size = 0;
    explicit MappedFile(const std::string& path) {
        int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK);  // a FIFO must not block the open
        struct stat st;
        require(fd >= 0, "cannot open %s: %s", path.c_str(),
                errno == ENOENT && lstat(path.c_str(), &st) == 0 ? "a symlink to a missing file" : strerror(errno));
        if (fstat(fd, &st) == 0 && !S_ISREG(st.st_mode)) {
            close(fd);
            fail("%s is %s, not a regular file", path.c_str(), file_kind(st.st_mode));
        }
        if (fstat(fd, &st) != 0 || st.st_size < (off_t)(HEADER_INTS * 4)) {
            close(fd);
            fail("%s is truncated: shorter than its %d-byte header", path.c_str(), HEADER_INTS * 4);
        }
        size = st.st_size;
        void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
        close(fd);
        require(p != MAP_FAILED, "cannot map %s: %s", path.c_str(), strerror(errno));
        data = (const uint8_t*)p;
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    ~MappedFile() { munmap((void*)data, size); }
    const int32_t* header() const { return (const int32_t*)data; }
};

// The names in a folder, without "." and "..".
static std::vector<std::string> list_folder(const std::string& dir) {
    DIR* d = opendir(dir.c_str());
    require(d, "cannot list %s: %s", dir.c_str(), strerror(errno));
    std::vector<std::string> names;
    while (dirent* e = readdir(d))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) names.push_back(e->d_name);
    closedir(d);
    return names;
}

static std::string shard_path(const std::string& dir, const char* split, int index) {
    char name[64];
    snprintf(name, sizeof(name), "/%s_%03d.bin", split, index);
    return dir + name;
}

// How many shards a split has: they must be numbered 000, 001, ... without a gap, so
// that a lost or misnamed file stops the run instead of silently shrinking the split.
// Names are listed, not stat'ed: a dangling symlink or a loop counts as a shard here
// and is then reported by name when it fails to open.
static int count_shards(const std::string& dir, const char* split) {
    std::set<int> found;
    const std::string pattern = std::string(split) + "_%9d.bi%c";
    for (const std::string& name : list_folder(dir)) {
        int index;
        char tail;
        if (sscanf(name.c_str(), pattern.c_str(), &index, &tail) == 2 && index >= 0 &&
            "/" + name == shard_path("", split, index))
            found.insert(index);
    }
    int count = 0;
    while (found.count(count)) count++;
    require(found.size() == (size_t)count, "%s is missing, but %s exists: shards must be numbered without gaps",
            shard_path(dir, split, count).c_str(), shard_path(dir, split, *found.rbegin()).c_str());
    return count;
}

// One split (train or val) of a dataset folder: every shard mapped and checked.
struct Dataset {
    std::vector<std::unique_ptr<MappedFile>> shards;
    std::vector<long> first;  // index of each shard's first image
    long count = 0;
    int H = 0, W = 0, classes = 0;

    Dataset(const std::string& dir, const char* split) {
        for (int i = 0, shard_count = count_shards(dir, split); i < shard_count; i++) {
            std::string path = shard_path(dir, split, i);
            shards.emplace_back(new MappedFile(path));
            const int32_t* h = shards.back()->header();
            require(h[0] == DATA_MAGIC && h[1] == 1,
                    "%s is not a dataset shard (magic %d, version %d; expected %d, 1)",
                    path.c_str(), h[0], h[1], DATA_MAGIC);
            const int n = h[2], sh = h[3], sw = h[4], c = h[5], k = h[6];
            require(n > 0 && sh > 0 && sw > 0 && sh <= MAX_IMAGE_SIDE && sw <= MAX_IMAGE_SIDE && c == 3
                        && k > 0 && k <= MAX_CLASSES,
                    "%s has a bad header (N=%d H=%d W=%d C=%d classes=%d; sides 1..%d, C 3, classes 1..%d)",
                    path.c_str(), n, sh, sw, c, k, (int)MAX_IMAGE_SIDE, (int)MAX_CLASSES);
            if (i == 0) H = sh, W = sw, classes = k;
            require(sh == H && sw == W && k == classes,
                    "%s: %dx%d images of %d classes, but %s has %dx%d of %d", path.c_str(), sh, sw, k,
                    shard_path(dir, split, 0).c_str(), H, W, classes);
            size_t expected = HEADER_INTS * 4 + (size_t)n * 4 + (size_t)n * sh * sw * 3;
            require(shards.back()->size == expected, "%s is %s: %zu bytes, expected %zu", path.c_str(),
                    shards.back()->size < expected ? "truncated" : "too long", shards.back()->size, expected);
            const int32_t* labels = h + HEADER_INTS;
            for (int j = 0; j < n; j++)
                require(labels[j] >= 0 && labels[j] < classes,
                        "%s: label %d of image %d is out of range [0, %d)", path.c_str(), labels[j], j, classes);
            first.push_back(count);
            count += n;
        }
    }

    // Copy image i (HWC uint8) to out and return its label.
    int read(long i, uint8_t* out) const {
        int s = (int)(std::upper_bound(first.begin(), first.end(), i) - first.begin()) - 1;
        const int32_t* h = shards[s]->header();
        long j = i - first[s];
        size_t pixels = (size_t)H * W * 3;
        memcpy(out, shards[s]->data + HEADER_INTS * 4 + (size_t)h[2] * 4 + j * pixels, pixels);
        return h[HEADER_INTS + j];
    }
};

// Every one of v[0..n) must be a finite number in [lo, hi] (NaN fails every comparison).
static void require_values(const std::string& path, const char* what, const float* v, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++)
        require(v[i] >= lo && v[i] <= hi, "%s: %s[%zu] is %g, outside [%g, %g]", path.c_str(), what, i, v[i], lo, hi);
}

// stats.bin: the training set's mean image and the PCA of its RGB values.
struct Stats {
    std::vector<float> mean;
    float eigval[3], eigvec[9];

    Stats(const std::string& dir, int H, int W) {
        std::string path = dir + "/stats.bin";
        MappedFile f(path);
        const int32_t* h = f.header();
        require(h[0] == STATS_MAGIC && h[1] == 1,
                "%s is not a statistics file (magic %d, version %d; expected %d, 1)", path.c_str(),
                h[0], h[1], STATS_MAGIC);
        require(h[2] == H && h[3] == W && h[4] == 3, "%s is for %dx%dx%d images, the shards hold %dx%dx3",
                path.c_str(), h[2], h[3], h[4], H, W);
        size_t pixels = (size_t)H * W * 3;
        size_t expected = HEADER_INTS * 4 + (pixels + 12) * 4;
        require(f.size == expected, "%s is %zu bytes, expected %zu", path.c_str(), f.size, expected);
        const float* body = (const float*)(f.data + HEADER_INTS * 4);
        // Plausible values for 0..255 pixels: a mean within the pixel range; eigenvalues
        // of a covariance, at most 255^2 (-1 allows rounding around a zero eigenvalue);
        // eigenvectors of unit length.
        require_values(path, "mean", body, pixels, 0, 255);
        require_values(path, "eigval", body + pixels, 3, -1, 255 * 255);
        require_values(path, "eigvec", body + pixels + 3, 9, -1.001f, 1.001f);
        mean.assign(body, body + pixels);
        memcpy(eigval, body + pixels, sizeof(eigval));
        memcpy(eigvec, body + pixels + 3, sizeof(eigvec));
    }
};

// The augmentation of one training batch of n images in `epoch`, as the paper draws it:
// for every image a crop offset uniform over every position, a mirror with probability
// 1/2, and PCA-lighting weights alpha ~ N(0, 0.1) on pixels scaled to [0, 1], where the
// eigenvalues are 255^2 times smaller: in the 0..255 units of the data that is alpha / 255.
// The 2012 code draws one offset and mirror per chunk of 32 images, weights 0.1 z with
// z ~ N(0, 1) for the square roots of the eigenvalues, divides the crop by 1 + 0.1, and
// stops the colour noise after recipe.lighting_epochs. Returns the divisor.
static float draw_augmentation(HostRng& rng, const Recipe& r, long epoch, int n, int H, int W, int crop,
                               int* offsets, uint8_t* flips, float* alphas) {
    const bool lighting = r.lighting_epochs == 0 || epoch < r.lighting_epochs;
    const double alpha_std = !lighting ? 0.0 : r.lighting_stdev ? 0.1 : 0.1 / 255.0;
    for (int i = 0; i < n; i++) {
        if (i % r.crop_chunk == 0) {
            offsets[2 * i] = (int)rng.below(H - crop + 1);
            offsets[2 * i + 1] = (int)rng.below(W - crop + 1);
            flips[i] = rng.uniform() < 0.5;
        } else {
            offsets[2 * i] = offsets[2 * i - 2], offsets[2 * i + 1] = offsets[2 * i - 1], flips[i] = flips[i - 1];
        }
        for (int c = 0; c < 3; c++) alphas[3 * i + c] = (float)(alpha_std * rng.normal());
    }
    return lighting && r.lighting_stdev ? 1.1f : 1.0f;
}

// Batches of one split, assembled on a background thread. Training batches (train =
// true) follow the epoch permutations; evaluation batches are the split in order, the
// last one possibly smaller, always centre-cropped.
struct Loader {
    const Dataset& data;
    const Recipe& recipe;
    int batch, crop;
    bool train, augment;
    uint64_t seed;
    Batch slots[2];
    int current = 0;
    std::future<void> pending;
    long permutation_epoch = -1;  // the epoch `permutation` belongs to (background thread only)
    std::vector<long> permutation;

    Loader(const Dataset& d, int batch_size, const Arch& arch, bool training, bool augmenting, uint64_t s)
        : data(d), recipe(recipe_of(arch)), batch(batch_size), crop(arch.crop), train(training), augment(augmenting),
          seed(s) {
        size_t pixels = (size_t)d.H * d.W * 3;
        for (Batch& b : slots) {
            cudaCheck(cudaMallocHost((void**)&b.images, batch * pixels));
            cudaCheck(cudaMallocHost((void**)&b.labels, batch * sizeof(int)));
            cudaCheck(cudaMallocHost((void**)&b.offsets, 2 * batch * sizeof(int)));
            cudaCheck(cudaMallocHost((void**)&b.flips, batch));
            cudaCheck(cudaMallocHost((void**)&b.alphas, 3 * batch * sizeof(float)));
        }
    }
    Loader(const Loader&) = delete;
    Loader& operator=(const Loader&) = delete;
    ~Loader() {
        if (pending.valid()) pending.wait();
        for (Batch& b : slots) {
            cudaFreeHost(b.images);
            cudaFreeHost(b.labels);
            cudaFreeHost(b.offsets);
            cudaFreeHost(b.flips);
            cudaFreeHost(b.alphas);
        }
    }

    long steps_per_epoch() const { return data.count / batch; }
    long eval_batches() const { return (data.count + batch - 1) / batch; }

    // The dataset index of position i of epoch e: a Fisher-Yates shuffle keyed by (seed, e).
    long shuffled(long epoch, long i) {
        if (epoch != permutation_epoch) {
            permutation.resize(data.count);
            for (long j = 0; j < data.count; j++) permutation[j] = j;
            HostRng rng(seed, RNG_SHUFFLE, epoch);
            for (long j = data.count - 1; j > 0; j--) std::swap(permutation[j], permutation[rng.below(j + 1)]);
            permutation_epoch = epoch;
        }
        return permutation[i];
    }

    // Assemble batch `index` (the step when training) into b.
    void fill(Batch& b, long index) {
        size_t pixels = (size_t)data.H * data.W * 3;
        long start = train ? index % steps_per_epoch() * batch : index * batch;
        b.n = (int)std::min<long>(batch, data.count - start);
        for (int i = 0; i < b.n; i++) {
            long image = train ? shuffled(index / steps_per_epoch(), start + i) : start + i;
            b.labels[i] = data.read(image, b.images + i * pixels);
        }
        if (train && augment) {
            HostRng rng(seed, RNG_AUGMENT, index);
            b.divisor = draw_augmentation(rng, recipe, index / steps_per_epoch(), b.n, data.H, data.W, crop, b.offsets,
                                          b.flips, b.alphas);
            return;
        }
        b.divisor = 1.0f;  // the centre crop, unchanged
        for (int i = 0; i < b.n; i++) {
            b.offsets[2 * i] = (data.H - crop) / 2;
            b.offsets[2 * i + 1] = (data.W - crop) / 2;
            b.flips[i] = 0;
            for (int c = 0; c < 3; c++) b.alphas[3 * i + c] = 0.0f;
        }
    }

    // Start assembling batch `index` in the background.
    void prefetch(long index) {
        Batch* b = &slots[1 - current];
        pending = std::async(std::launch::async, [this, b, index] { fill(*b, index); });
    }

    // The batch of the last prefetch (errors of the background thread are rethrown
    // here); batch `next` (if >= 0) starts assembling at once.
    const Batch& take(long next) {
        pending.get();
        current = 1 - current;
        if (next >= 0) prefetch(next);
        return slots[current];
    }
};

// ----------------------------------------------------------------------------
// 13. Training loop
//
// The options and the state of a run, the loop that trains, validates and checkpoints,
// the ten-view evaluation, then the checkpoint files and the run that ties it together.

// Everything the command line sets (section 14 lists the flags and their defaults).
struct Options {
    std::string data, out = "out", resume, arch = "alexnet";
    int batch = 128;
    float lr = 0.01f, momentum = 0.9f, weight_decay = 0.0005f, dropout = 0.5f;
    long epochs = 90, steps = 0, eval_every = 0, save_every = 1000, bench = 0;
    uint64_t seed = 1;
    bool augment = true, eval_only = false;
    Precision precision = FP32;  // of the matrix products
    int keep = 3, log_every = 10, patience = 3, max_drops = 3;
    std::vector<int> lr_steps;  // epochs at which the learning rate is divided by 10
    std::vector<int> devices;   // tower 0's and tower 1's device (one entry: both towers)
    std::set<std::string> given;  // flags on the command line: they override a checkpoint
};

struct TrainState {
    long step = 0;                // SGD steps done
    int plateau_drops = 0;        // learning-rate divisions made by the plateau rule
    int bad_evals = 0;            // evaluations since the best validation error
    float best_error = INFINITY;  // best validation top-1 error
    float loss = NAN;             // the last step's loss
};

// --- 13a. Signals, the log, the output folder, the schedule and validation

// Ctrl-C (SIGINT) and SIGTERM (kill, systemd, Docker, SLURM): the first finishes the
// step and checkpoints; a second one ends the process at once, by the signal's default.
// The handler says so on stderr, with write(), which is safe in a signal handler.
static volatile sig_atomic_t stop_requested = 0;
static void on_stop_signal(int sig) {
    if (stop_requested) {
        signal(sig, SIG_DFL);
        raise(sig);
    }
    stop_requested = 1;
    static const char notice[] = "stopping after this step to checkpoint; a second Ctrl-C or SIGTERM stops at once\n";
    const ssize_t written = write(STDERR_FILENO, notice, sizeof(notice) - 1);
    (void)written;  // a notice that cannot be written changes nothing
}

// Lines to stdout and to OUT/log.txt; to_file: to log.txt only (the error that ends a
// run, which main prints to stderr).
struct Log {
    FILE* file = nullptr;
    ~Log() { if (file) fclose(file); }
    void open(const std::string& path) {
        file = fopen(path.c_str(), "a");
        require(file, "cannot open %s: %s", path.c_str(), strerror(errno));
    }
    void operator()(const char* fmt, ...) {
        va_list args;
        va_start(args, fmt);
        emit(true, fmt, args);
        va_end(args);
    }
    void to_file(const char* fmt, ...) {
        va_list args;
        va_start(args, fmt);
        emit(false, fmt, args);
        va_end(args);
    }
    void emit(bool to_stdout, const char* fmt, va_list args) {
        char line[1024];
        vsnprintf(line, sizeof(line), fmt, args);
        if (to_stdout) printf("%s\n", line), fflush(stdout);
        if (file) fprintf(file, "%s\n", line), fflush(file);  // a full disk loses the line, nothing else
    }
};

// One run per output folder: an exclusive flock on OUT/lock, which holds the owner's
// process id. The kernel releases the lock however the process ends (even by SIGKILL),
// so a stale lock cannot exist; the file stays, since removing it would let a third run
// lock a new file while a second still holds the old one.
static void lock_output(const std::string& out) {
    const std::string path = out + "/lock";
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0666);
    require(fd >= 0, "cannot open %s: %s", path.c_str(), strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        const int error = errno;
        char owner[32] = {0};
        if (pread(fd, owner, sizeof(owner) - 1, 0) < 0) owner[0] = 0;
        owner[strcspn(owner, "\n")] = 0;
        close(fd);
        require(error == EWOULDBLOCK, "cannot lock %s: %s", path.c_str(), strerror(error));
        fail("%s is in use by another run (process %s); wait for it, or give another --out", out.c_str(),
             owner[0] ? owner : "unknown");
    }
    char pid[32];
    const int length = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
    require(ftruncate(fd, 0) == 0 && pwrite(fd, pid, length, 0) == length, "cannot write %s: %s", path.c_str(),
            strerror(errno));
    // fd stays open, and the lock held, until the process ends.
}

// OUT/ckpt_NNNNNNNN.bin: "ckpt_", the step in at least 8 digits, ".bin".
static bool is_checkpoint_name(const std::string& name) {
    const size_t digits = name.size() - std::min(name.size(), strlen("ckpt_.bin"));
    return digits >= 8 && name.compare(0, 5, "ckpt_") == 0 && name.compare(5 + digits, 4, ".bin") == 0 &&
           std::all_of(name.begin() + 5, name.begin() + 5 + digits, [](char c) { return c >= '0' && c <= '9'; });
}

// A kill between a checkpoint's write and its rename leaves OUT/ckpt_NNNNNNNN.bin.tmp
// (or latest.bin.tmp) behind; with the lock held, no other run can be writing one.
static void remove_stale_temporaries(const std::string& out, Log& log) {
    for (const std::string& name : list_folder(out)) {
        const std::string stem = name.substr(0, name.size() - std::min<size_t>(name.size(), 4));
        const bool stale = name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0 &&
                           (is_checkpoint_name(stem) || stem == "latest.bin");
        if (stale && unlink((out + "/" + name).c_str()) == 0)
            log("removed %s/%s, left by an interrupted checkpoint", out.c_str(), name.c_str());
    }
}


static std::string duration(double seconds) {
    char text[32];
    long s = (long)seconds;
    if (s >= 3600) snprintf(text, sizeof(text), "%ldh%02ldm", s / 3600, s / 60 % 60);
    else snprintf(text, sizeof(text), "%ldm%02lds", s / 60, s % 60);
    return text;
}

static double now_seconds() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// The paper's schedule: the base rate divided by 10 for every drop so far, where drops
// come from the plateau rule and from the --lr-steps epochs, at most max_drops in all.
static int lr_drops(const Options& o, const TrainState& s, long epoch) {
    int drops = s.plateau_drops;
    for (int e : o.lr_steps) drops += epoch >= e;
    return std::min(drops, o.max_drops);
}
static float learning_rate(const Options& o, const TrainState& s, long epoch) {
    return (float)(o.lr * pow(0.1, lr_drops(o, s, epoch)));
}
// Every parameter group's rate in `epoch`: the schedule above, except where the preset's
// recipe sets the biases' rate or anneals and freezes conv1.
static Rates learning_rates(const Recipe& r, const Options& o, const TrainState& s, long epoch) {
    const float lr = learning_rate(o, s, epoch);
    Rates rates{lr, lr, lr, lr, false};
    if (r.bias_lr_scale > 0) rates.biases = rates.conv1_biases = r.bias_lr_scale * o.lr;
    if (r.conv1_slow_epoch >= 0 && epoch >= r.conv1_slow_epoch) rates.conv1_weights = 0.1f * lr;
    rates.conv1_frozen = r.conv1_frozen_epoch >= 0 && epoch >= r.conv1_frozen_epoch;
    return rates;
}

// A NaN's sign bit is arbitrary (x86 makes inf - inf negative) and printf shows it:
// a NaN loss prints as "nan", never "-nan".
static double unsigned_nan(double x) { return std::isnan(x) ? NAN : x; }

struct Evaluation {
    double loss = 0, top1_error = 0, top5_error = 0;
    long images = 0;
};

// Centre-crop loss and top-1/top-5 error over the whole split (dropout in test mode).
static Evaluation evaluate(Model& model, Loader& loader, uint64_t seed) {
    Evaluation e;
    long batches = loader.eval_batches(), top1 = 0, top5 = 0;
    loader.prefetch(0);
    for (long i = 0; i < batches; i++) {
        const Batch& b = loader.take(i + 1 < batches ? i + 1 : -1);
        model.load_batch(b);
        model.forward(b.n, false, seed, 0);
        StepResult r = model.finish(b.n);
        e.loss += r.loss * b.n;
        top1 += r.top1, top5 += r.top5, e.images += b.n;
    }
    e.loss = unsigned_nan(e.loss / e.images);
    e.top1_error = 1.0 - (double)top1 / e.images;
    e.top5_error = 1.0 - (double)top5 / e.images;
    return e;
}

// --- 13b. Evaluation with ten views
//
// The paper's test-time averaging: each validation image is seen through ten views, the
// four corner crops and the centre crop, each also mirrored, and the ten softmax outputs
// are averaged before the loss and the top-k are taken. A view is only a crop offset and
// a flip for the augmentation kernel. The softmax runs on tower 0, which holds both
// towers' logits; the averaging runs on the host in double, adding the views in order,
// exactly as alexnet.py's view_probabilities does, so that the two agree. View 4 is the
// plain centre crop: its scores come with the same forward passes.

enum { NUM_VIEWS = 10, CENTRE_VIEW = 4 };

// View v (0..9) of an H x W image for crops of crop x crop: offsets (y, x) and the mirror.
static void view_geometry(int v, int H, int W, int crop, int* y, int* x, uint8_t* flip) {
    const int ys[5] = {0, 0, H - crop, H - crop, (H - crop) / 2};
    const int xs[5] = {0, W - crop, 0, W - crop, (W - crop) / 2};
    *y = ys[v % 5], *x = xs[v % 5], *flip = v >= 5;
}

// The softmax outputs of the model for n stored-size images, each cropped at its
// offsets and mirrored where its flip is 1: the test-mode forward of both towers, then
// softmax_forward on tower 0 into a buffer of the model's, copied to host_probs [n][K].
struct Predictor {
    Model& model;
    float* probs;  // [capacity][classes] on tower 0
    std::vector<float> alphas;  // no lighting at test time

    explicit Predictor(Model& m) : model(m), alphas(3 * m.capacity, 0.0f) {
        cudaCheck(cudaSetDevice(m.towers[0].device));
        probs = m.towers[0].alloc<float>((long)m.capacity * m.arch.classes);
    }

    void run(float* host_probs, const uint8_t* images, const int* labels, const int* offsets,
             const uint8_t* flips, int n) {
        Batch b;
        b.n = n;
        b.images = const_cast<uint8_t*>(images);
        b.labels = const_cast<int*>(labels);
        b.offsets = const_cast<int*>(offsets);
        b.flips = const_cast<uint8_t*>(flips);
        b.alphas = alphas.data();
        model.load_batch(b);
        model.forward(n, false, 0, 0);
        Tower& T0 = model.towers[0];
        const int K = model.arch.classes;
        cudaCheck(cudaSetDevice(T0.device));
        softmax_forward(probs, T0.meet[AT_LOGITS].cat, n, K, T0.stream);
        cudaCheck(cudaMemcpyAsync(host_probs, probs, (size_t)n * K * sizeof(float),
                                  cudaMemcpyDeviceToHost, T0.stream));
        model.finish(n);  // waits for both towers
    }
};

// Running loss (-log p[label], p floored at 1e-30 so that a confident miss stays finite)
// and top-1/top-5 counts. The rank of the label counts the classes above it plus the
// equal ones at lower indices: the same tie rule as topk_rank in alexnet.py.
struct Scores {
    double loss = 0;
    long top1 = 0, top5 = 0, images = 0;

    void add(const double* p, int label, int K) {
        loss -= log(std::max(p[label], 1e-30));  // NaN stays NaN
        int rank = 0;
        bool nan = false;
        for (int k = 0; k < K; k++) {
            rank += p[k] > p[label] || (p[k] == p[label] && k < label);
            nan |= std::isnan(p[k]);
        }
        if (!nan) top1 += rank < 1, top5 += rank < 5;  // NaN scores never count as correct
        images++;
    }
    Evaluation result() const {
        Evaluation e;
        e.images = images;
        e.loss = unsigned_nan(loss / images);
        e.top1_error = 1.0 - (double)top1 / images;
        e.top5_error = 1.0 - (double)top5 / images;
        return e;
    }
};

struct ViewEvaluation {
    Evaluation centre, ten;
};

// Centre-crop and ten-view scores over the whole split.
static ViewEvaluation evaluate_ten_views(Model& model, Loader& loader) {
    const int K = model.arch.classes, cap = model.capacity, H = model.image_h, W = model.image_w;
    Predictor predictor(model);
    std::vector<float> probs((size_t)cap * K);
    std::vector<double> average((size_t)cap * K), centre(K);
    std::vector<int> offsets(2 * cap);
    std::vector<uint8_t> flips(cap);
    Scores centre_scores, ten_scores;
    // Progress on stderr: a line redrawn per batch on a terminal, else one every 10 s.
    const bool terminal = isatty(fileno(stderr));
    const double start = now_seconds();
    double last_report = start;
    const long batches = loader.eval_batches();
    loader.prefetch(0);
    for (long i = 0; i < batches; i++) {
        const Batch& b = loader.take(i + 1 < batches ? i + 1 : -1);
        std::fill(average.begin(), average.end(), 0.0);
        for (int v = 0; v < NUM_VIEWS; v++) {
            for (int j = 0; j < b.n; j++)
                view_geometry(v, H, W, model.arch.crop, &offsets[2 * j], &offsets[2 * j + 1], &flips[j]);
            predictor.run(probs.data(), b.images, b.labels, offsets.data(), flips.data(), b.n);
            for (long j = 0; j < (long)b.n * K; j++) average[j] += probs[j];
            if (v == CENTRE_VIEW)
                for (int j = 0; j < b.n; j++) {
                    std::copy(&probs[(size_t)j * K], &probs[(size_t)(j + 1) * K], centre.begin());
                    centre_scores.add(centre.data(), b.labels[j], K);
                }
        }
        for (int j = 0; j < b.n; j++) {
            for (int k = 0; k < K; k++) average[(size_t)j * K + k] /= NUM_VIEWS;
            ten_scores.add(&average[(size_t)j * K], b.labels[j], K);
        }
        const double t = now_seconds();
        if (terminal || t - last_report >= 10 || i + 1 == batches) {
            const double elapsed = t - start;
            fprintf(stderr, "%s10-view evaluation: %ld/%ld images | elapsed %s | eta %s%s", terminal ? "\r" : "",
                    ten_scores.images, (long)loader.data.count, duration(elapsed).c_str(),
                    duration(elapsed / (i + 1) * (batches - i - 1)).c_str(), terminal ? "" : "\n");
            last_report = t;
        }
    }
    if (terminal) fprintf(stderr, "\n");
    return {centre_scores.result(), ten_scores.result()};
}

// --- 13c. The training loop

// --bench N: the training step alone (forward, backward, SGD update) on one batch that
// stays on the device, so neither the loader nor the upload is timed; CUDA events on
// tower 0's stream bracket N steps after 3 warm-up steps (each step ends synchronised
// on both towers, so the events span the whole step).
static void benchmark(Model& model, Loader& loader, const Options& o, Log& log) {
    loader.prefetch(0);
    const Batch& b = loader.take(-1);
    model.load_batch(b);
    auto step = [&](long i) {
        model.forward(b.n, true, o.seed, i);
        model.backward(b.n, o.seed, i);
        model.update(learning_rates(recipe_of(model.arch), o, TrainState(), 0), o.momentum, o.weight_decay);
        return model.finish(b.n);
    };
    for (long i = 0; i < 3; i++) step(i);
    cudaCheck(cudaSetDevice(model.towers[0].device));
    StepResult r;
    const float ms = elapsed_ms(model.towers[0].stream, [&] {
        for (long i = 0; i < o.bench; i++) r = step(3 + i);
        cudaCheck(cudaSetDevice(model.towers[0].device));
    });
    log("bench | %ld steps of batch %d | %s | %.3f ms per step | %.1f images/s | last loss %.4f", o.bench, b.n,
        PRECISION_NAMES[o.precision], ms / o.bench, 1000.0 * o.bench * b.n / ms, r.loss);
}

// Writes a checkpoint of the model and the state (section 13d); returns its path.
static std::string save_checkpoint(Model& model, const Options& o, const TrainState& s);

// The training loop, from state.step to the last step.
static void train_loop(Model& model, Loader& loader, Loader* val_loader, const Options& o, TrainState& state,
                       Log& log) {
    const Arch& arch = model.arch;
    const Dataset& train = loader.data;
    const long val_count = val_loader ? val_loader->data.count : 0;
    const long per_epoch = loader.steps_per_epoch();
    const long eval_every = o.eval_every > 0 ? o.eval_every : per_epoch;
    long total = o.epochs * per_epoch;
    if (o.steps > 0) total = std::min(total, o.steps);
    log("%s preset: %ld parameters, crop %d, %d classes | %ld training images (%ld steps of %d per epoch), "
        "%ld validation | towers on devices %d and %d | %s matrix products | %s step %ld of %ld",
        PRESET_NAMES[arch.preset], arch_parameters(arch), arch.crop, arch.classes, train.count, per_epoch,
        o.batch, val_count, model.towers[0].device, model.towers[1].device, PRECISION_NAMES[o.precision],
        o.resume.empty() ? "starting at" : "resuming at",
        state.step, total);

    std::string last_checkpoint = o.resume.empty() ? "none" : o.resume;
    signal(SIGINT, on_stop_signal);
    signal(SIGTERM, on_stop_signal);
    if (state.step < total) loader.prefetch(state.step);
    const double start = now_seconds();
    double interval_start = start;
    long interval_images = 0, first_step = state.step;
    // However the loop ends, the last staged upload finishes reading the loader's batch
    // before the loader is destroyed.
    struct StagedUploads {
        Model& model;
        ~StagedUploads() {
            for (Tower& T : model.towers)
                if (T.uploaded) cudaEventSynchronize(T.uploaded);
        }
    } staged_uploads{model};
    while (state.step < total) {
        const long step = state.step;
        int n;
        if (model.has_staged()) {
            n = model.load_staged();
        } else {
            const Batch& b = loader.take(step + 1 < total ? step + 1 : -1);
            n = b.n;
            model.load_batch(b);
        }
        const Rates rates = learning_rates(recipe_of(arch), o, state, step / per_epoch);
        model.forward(n, true, o.seed, step);
        model.backward(n, o.seed, step);
        model.update(rates, o.momentum, o.weight_decay);
        if (step + 1 < total) {  // batch step+1 uploads while this step computes
            model.wait_staged();   // the host batch that take() refills has been read
            model.stage(loader.take(step + 2 < total ? step + 2 : -1));
        }
        StepResult r = model.finish(n);
        require(std::isfinite(r.loss), "non-finite loss (%g) at step %ld; the last good checkpoint (%s) is unchanged",
                r.loss, step + 1, last_checkpoint.c_str());
        state.step = step + 1;
        state.loss = (float)r.loss;
        interval_images += n;

        if (state.step % o.log_every == 0 || state.step == total || state.step == first_step + 1) {
            double t = now_seconds(), elapsed = t - start;
            double eta = elapsed / (state.step - first_step) * (total - state.step);
            log("step %ld/%ld | epoch %.2f | loss %.4f | top-1 error %.4f | top-5 error %.4f | lr %.2e | "
                "%.1f img/s | elapsed %s | eta %s",
                state.step, total, (double)state.step / per_epoch, r.loss, 1.0 - (double)r.top1 / n,
                1.0 - (double)r.top5 / n, rates.weights,
                interval_images / (t - interval_start), duration(elapsed).c_str(), duration(eta).c_str());
            interval_start = t, interval_images = 0;
        }
        // Validation as scheduled, and after the last step (a report only: the learning-rate
        // schedule changes at scheduled evaluations), before that step's checkpoint.
        const bool scheduled = state.step % eval_every == 0;
        if (val_loader && (scheduled || state.step == total)) {
            const double eval_start = now_seconds();
            Evaluation e = evaluate(model, *val_loader, o.seed);
            interval_start += now_seconds() - eval_start;  // images/s counts training only
            log("eval step %ld | val loss %.4f | top-1 error %.4f | top-5 error %.4f | %ld images",
                state.step, e.loss, e.top1_error, e.top5_error, e.images);
            require(std::isfinite(e.loss),
                    "non-finite validation loss (%g) at step %ld; the last good checkpoint (%s) is unchanged", e.loss,
                    state.step, last_checkpoint.c_str());
            if (scheduled && e.top1_error < state.best_error) {
                state.best_error = (float)e.top1_error, state.bad_evals = 0;
            } else if (scheduled && o.patience > 0 && ++state.bad_evals >= o.patience &&
                       lr_drops(o, state, state.step / per_epoch) < o.max_drops) {
                state.plateau_drops++, state.bad_evals = 0;
                log("validation error has not improved for %d evaluations: learning rate divided by 10",
                    o.patience);
            }
        }
        const bool stop = stop_requested;
        if ((o.save_every > 0 && state.step % o.save_every == 0) || state.step == total || stop) {
            try {
                last_checkpoint = save_checkpoint(model, o, state);
            } catch (const AlexNetError& e) {
                fail("%s; the last good checkpoint (%s) is unchanged", e.what(), last_checkpoint.c_str());
            }
            log("checkpoint %s", last_checkpoint.c_str());
        }
        if (stop) {
            log("interrupted: stopped after step %ld", state.step);
            return;
        }
    }
    log("done: %ld steps in %s", state.step - first_step, duration(now_seconds() - start).c_str());
}

// --- 13d. Checkpoint files
//
// A checkpoint (doc/formats.md, "Checkpoint"): int32 header[256], then every parameter of the
// whole network in checkpoint order (Model::transfer), then the momentum in the same
// order. The header holds the architecture, the training options and the training state;
// since every random choice is a function of (seed, step), that is all a resumed run
// needs to continue bit for bit.

enum { CKPT_MAGIC = 20121003, CKPT_VERSION = 1 };
enum CheckpointField {  // header indices; "f32" fields hold the bits of a float32
    H_MAGIC = 0, H_VERSION = 1, H_PRESET = 2, H_CROP = 3, H_CLASSES = 4,
    H_CONV_OUT = 5, H_CONV_KERNEL = 10, H_CONV_STRIDE = 15, H_CONV_PAD = 20,  // 5 each
    H_FC_OUT = 25,                                                            // fc6, fc7
    H_POOL_SIZE = 27, H_POOL_STRIDE = 28, H_LRN_SIZE = 29,
    H_LRN_ALPHA = 30, H_LRN_BETA = 31, H_LRN_K = 32, H_INIT_STD = 33,         // f32
    H_PARAMS = 34,                                                            // int64: 34 low, 35 high
    H_STEP = 40,                                                              // int64: 40, 41
    H_SEED = 42,                                                              // int64: 42, 43
    H_BATCH = 44, H_LR = 45, H_MOMENTUM = 46, H_WEIGHT_DECAY = 47, H_DROPOUT = 48,  // f32 45..48
    H_AUGMENT = 49, H_EVAL_EVERY = 50, H_PATIENCE = 51, H_MAX_DROPS = 52,
    H_PLATEAU_DROPS = 53, H_BAD_EVALS = 54, H_BEST_ERROR = 55, H_LOSS = 56,    // f32 55, 56
    H_EPOCHS = 57, H_STEPS = 58, H_NUM_LR_STEPS = 59, H_LR_STEPS = 60,         // up to 8 epochs
    MAX_LR_STEPS = 8,
    H_IMAGE_H = 68, H_IMAGE_W = 69,  // the training images' size (0: not recorded, older checkpoints)
    H_CONV1_RELU_AFTER_POOL = 70,    // the 2012 code's layer variants (0 in older checkpoints: none)
    H_SPATIAL_SIZE = 71, H_SPATIAL_ALPHA = 72, H_SPATIAL_BETA = 73, H_SPATIAL_K = 74,  // f32 72..74
    H_PRECISION = 75  // of the matrix products: 0 fp32 (also older checkpoints), 1 tf32, 2 bf16
};

static int32_t float_bits(float f) { int32_t i; memcpy(&i, &f, 4); return i; }
static float bits_float(int32_t i) { float f; memcpy(&f, &i, 4); return f; }
static void put_int64(int32_t* h, int at, int64_t v) { h[at] = (int32_t)(uint32_t)v; h[at + 1] = (int32_t)(v >> 32); }
static int64_t get_int64(const int32_t* h, int at) {  // shifted unsigned: a negative high word is no UB
    return (int64_t)((uint64_t)(uint32_t)h[at] | (uint64_t)(uint32_t)h[at + 1] << 32);
}

static void encode_header(int32_t* h, const Model& model, const Options& o, const TrainState& s) {
    const Arch& a = model.arch;
    memset(h, 0, HEADER_INTS * sizeof(int32_t));
    h[H_MAGIC] = CKPT_MAGIC, h[H_VERSION] = CKPT_VERSION;
    h[H_PRESET] = a.preset, h[H_CROP] = a.crop, h[H_CLASSES] = a.classes;
    for (int l = 0; l < NUM_CONV; l++) {
        h[H_CONV_OUT + l] = a.conv_out[l], h[H_CONV_KERNEL + l] = a.conv_kernel[l];
        h[H_CONV_STRIDE + l] = a.conv_stride[l], h[H_CONV_PAD + l] = a.conv_pad[l];
    }
    h[H_FC_OUT] = a.fc_out[0], h[H_FC_OUT + 1] = a.fc_out[1];
    h[H_POOL_SIZE] = a.pool_size, h[H_POOL_STRIDE] = a.pool_stride, h[H_LRN_SIZE] = a.lrn_size;
    h[H_LRN_ALPHA] = float_bits(a.lrn_alpha), h[H_LRN_BETA] = float_bits(a.lrn_beta);
    h[H_LRN_K] = float_bits(a.lrn_k), h[H_INIT_STD] = float_bits(a.init_std);
    put_int64(h, H_PARAMS, arch_parameters(a));
    put_int64(h, H_STEP, s.step);
    put_int64(h, H_SEED, (int64_t)o.seed);
    h[H_BATCH] = o.batch, h[H_LR] = float_bits(o.lr), h[H_MOMENTUM] = float_bits(o.momentum);
    h[H_WEIGHT_DECAY] = float_bits(o.weight_decay), h[H_DROPOUT] = float_bits(o.dropout);
    h[H_AUGMENT] = o.augment, h[H_EVAL_EVERY] = (int32_t)o.eval_every;
    h[H_PATIENCE] = o.patience, h[H_MAX_DROPS] = o.max_drops;
    h[H_PLATEAU_DROPS] = s.plateau_drops, h[H_BAD_EVALS] = s.bad_evals;
    h[H_BEST_ERROR] = float_bits(s.best_error), h[H_LOSS] = float_bits(s.loss);
    h[H_EPOCHS] = (int32_t)o.epochs, h[H_STEPS] = (int32_t)o.steps;
    h[H_NUM_LR_STEPS] = (int32_t)o.lr_steps.size();
    for (size_t i = 0; i < o.lr_steps.size(); i++) h[H_LR_STEPS + i] = o.lr_steps[i];
    h[H_IMAGE_H] = model.image_h, h[H_IMAGE_W] = model.image_w;
    h[H_CONV1_RELU_AFTER_POOL] = a.conv1_relu_after_pool, h[H_SPATIAL_SIZE] = a.spatial_size;
    h[H_SPATIAL_ALPHA] = float_bits(a.spatial_alpha), h[H_SPATIAL_BETA] = float_bits(a.spatial_beta);
    h[H_SPATIAL_K] = float_bits(a.spatial_k);
    h[H_PRECISION] = o.precision;
}

// Sets an option as its command-line flag would, with the flag's checks (section 14).
static void set_option(Options& o, const char* flag, const char* value);

// A checkpoint file, mapped and checked; its header fills in the architecture, the
// options that the command line did not give, and the training state. Every option
// read from the header goes through its flag's parser, so a header holds nothing that
// the command line would refuse; the state fields get ranges of their own.
struct Checkpoint {
    MappedFile file;
    Arch arch;
    long params;
    int image_h, image_w;  // the training images' size; 0 when not recorded

    Checkpoint(const std::string& path, Options& o, TrainState& s) : file(path) {
        const int32_t* h = file.header();
        require(h[H_MAGIC] == CKPT_MAGIC, "%s is not an AlexNet checkpoint (magic %d, expected %d)",
                path.c_str(), h[H_MAGIC], CKPT_MAGIC);
        require(h[H_VERSION] == CKPT_VERSION, "%s: checkpoint version %d, this build reads %d",
                path.c_str(), h[H_VERSION], CKPT_VERSION);
        require(h[H_PRESET] >= 0 && h[H_PRESET] < NUM_PRESETS, "%s: unknown preset number %d",
                path.c_str(), h[H_PRESET]);
        arch = PRESETS[h[H_PRESET]];
        arch.crop = h[H_CROP], arch.classes = h[H_CLASSES];
        for (int l = 0; l < NUM_CONV; l++) {
            arch.conv_out[l] = h[H_CONV_OUT + l], arch.conv_kernel[l] = h[H_CONV_KERNEL + l];
            arch.conv_stride[l] = h[H_CONV_STRIDE + l], arch.conv_pad[l] = h[H_CONV_PAD + l];
        }
        arch.fc_out[0] = h[H_FC_OUT], arch.fc_out[1] = h[H_FC_OUT + 1];
        arch.pool_size = h[H_POOL_SIZE], arch.pool_stride = h[H_POOL_STRIDE];
        arch.lrn_size = h[H_LRN_SIZE], arch.lrn_alpha = bits_float(h[H_LRN_ALPHA]);
        arch.lrn_beta = bits_float(h[H_LRN_BETA]), arch.lrn_k = bits_float(h[H_LRN_K]);
        arch.init_std = bits_float(h[H_INIT_STD]);
        require(h[H_CONV1_RELU_AFTER_POOL] == 0 || h[H_CONV1_RELU_AFTER_POOL] == 1,
                "%s: bad header: conv1 ReLU order %d", path.c_str(), h[H_CONV1_RELU_AFTER_POOL]);
        arch.conv1_relu_after_pool = h[H_CONV1_RELU_AFTER_POOL] != 0;
        arch.spatial_size = h[H_SPATIAL_SIZE], arch.spatial_alpha = bits_float(h[H_SPATIAL_ALPHA]);
        arch.spatial_beta = bits_float(h[H_SPATIAL_BETA]), arch.spatial_k = bits_float(h[H_SPATIAL_K]);
        try {
            LayerShape shapes[NUM_LAYERS];
            tower_shapes(arch, 0, shapes);
        } catch (const AlexNetError& e) {
            fail("%s: bad architecture in the header: %s", path.c_str(), e.what());
        }
        params = arch_parameters(arch);
        require(get_int64(h, H_PARAMS) == params, "%s: the header says %lld parameters, its architecture has %ld",
                path.c_str(), (long long)get_int64(h, H_PARAMS), params);
        size_t expected = HEADER_INTS * 4 + (size_t)params * 8;
        require(file.size == expected, "%s is %s: %zu bytes, expected %zu", path.c_str(),
                file.size < expected ? "truncated" : "too long", file.size, expected);
        require(h[H_NUM_LR_STEPS] >= 0 && h[H_NUM_LR_STEPS] <= MAX_LR_STEPS, "%s: bad header", path.c_str());
        image_h = h[H_IMAGE_H], image_w = h[H_IMAGE_W];
        require((image_h == 0 && image_w == 0) || (image_h >= arch.crop && image_h <= MAX_IMAGE_SIDE &&
                                                   image_w >= arch.crop && image_w <= MAX_IMAGE_SIDE),
                "%s: bad header: image size %dx%d (crop %d)", path.c_str(), image_h, image_w, arch.crop);
        for (const float* v : {parameters(), momentum()}) {
            std::string bad = first_non_finite(arch, v);
            require(bad.empty(), "%s: %s%s: a checkpoint holds finite numbers only", path.c_str(),
                    v == parameters() ? "" : "the momentum of ", bad.c_str());
        }

        auto header_option = [&](const char* flag, const std::string& value) {
            if (o.given.count(flag)) return;  // the command line wins
            try {
                set_option(o, flag, value.c_str());
            } catch (const AlexNetError& e) {
                fail("%s: bad header: %s", path.c_str(), e.what());
            }
        };
        auto number = [](float v) { char text[32]; snprintf(text, sizeof(text), "%.9g", v); return std::string(text); };
        header_option("--seed", std::to_string((long long)get_int64(h, H_SEED)));
        header_option("--batch", std::to_string(h[H_BATCH]));
        header_option("--lr", number(bits_float(h[H_LR])));
        header_option("--momentum", number(bits_float(h[H_MOMENTUM])));
        header_option("--weight-decay", number(bits_float(h[H_WEIGHT_DECAY])));
        header_option("--dropout", number(bits_float(h[H_DROPOUT])));
        require(h[H_PRECISION] >= 0 && h[H_PRECISION] < NUM_PRECISIONS, "%s: bad header: precision %d",
                path.c_str(), h[H_PRECISION]);
        header_option("--precision", PRECISION_NAMES[h[H_PRECISION]]);
        header_option("--eval-every", std::to_string(h[H_EVAL_EVERY]));
        header_option("--patience", std::to_string(h[H_PATIENCE]));
        header_option("--max-drops", std::to_string(h[H_MAX_DROPS]));
        header_option("--epochs", std::to_string(h[H_EPOCHS]));
        header_option("--steps", std::to_string(h[H_STEPS]));
        std::string lr_steps;
        for (int i = 0; i < h[H_NUM_LR_STEPS]; i++) lr_steps += (i ? "," : "") + std::to_string(h[H_LR_STEPS + i]);
        if (lr_steps.empty()) {
            if (!o.given.count("--lr-steps")) o.lr_steps.clear();
        } else {
            header_option("--lr-steps", lr_steps);
        }
        require(h[H_AUGMENT] == 0 || h[H_AUGMENT] == 1, "%s: bad header: augment flag %d", path.c_str(), h[H_AUGMENT]);
        if (!o.given.count("--no-augment")) o.augment = h[H_AUGMENT] != 0;

        s.step = (long)get_int64(h, H_STEP);
        s.plateau_drops = h[H_PLATEAU_DROPS], s.bad_evals = h[H_BAD_EVALS];
        s.best_error = bits_float(h[H_BEST_ERROR]), s.loss = bits_float(h[H_LOSS]);
        require(s.step >= 0 && s.step <= INT32_MAX, "%s: bad header: step %ld", path.c_str(), s.step);
        require(s.plateau_drops >= 0 && s.plateau_drops <= 100 && s.bad_evals >= 0 && s.bad_evals <= 1000000,
                "%s: bad header: %d plateau drops, %d evaluations without progress", path.c_str(),
                s.plateau_drops, s.bad_evals);
        require(s.best_error == INFINITY || (s.best_error >= 0 && s.best_error <= 1),
                "%s: bad header: best validation error %g (a fraction, or inf before any)", path.c_str(),
                s.best_error);
        require(std::isnan(s.loss) || (s.loss >= 0 && std::isfinite(s.loss)),
                "%s: bad header: last loss %g", path.c_str(), s.loss);
        if (o.given.count("--arch"))
            require(o.arch == PRESET_NAMES[arch.preset], "--arch %s, but %s holds the %s preset",
                    o.arch.c_str(), path.c_str(), PRESET_NAMES[arch.preset]);
    }
    const float* parameters() const { return (const float*)(file.data + HEADER_INTS * 4); }
    const float* momentum() const { return parameters() + params; }
};

static void fsync_directory(const std::string& dir) {
    int fd = open(dir.c_str(), O_RDONLY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

// Write OUT/ckpt_NNNNNNNN.bin atomically (temporary file, fsync, rename), point
// OUT/latest.bin at it (a symlink, replaced atomically), and delete all but the newest
// `keep` checkpoints.
static std::string save_checkpoint(Model& model, const Options& o, const TrainState& s) {
    int32_t header[HEADER_INTS];
    encode_header(header, model, o, s);
    std::vector<float> params(model.num_params()), momentum(model.num_params());
    model.download_state(params.data(), momentum.data());
    for (const std::vector<float>* v : {&params, &momentum}) {  // the state is on the host anyway
        std::string bad = first_non_finite(model.arch, v->data());
        require(bad.empty(), "step %ld: %s%s: not saved", s.step, v == &params ? "" : "the momentum of ", bad.c_str());
    }

    char name[64];
    snprintf(name, sizeof(name), "ckpt_%08ld.bin", s.step);
    std::string path = o.out + "/" + name, temp = path + ".tmp";
    FILE* f = fopen(temp.c_str(), "wb");
    require(f, "cannot write %s: %s", temp.c_str(), strerror(errno));
    bool ok = fwrite(header, sizeof(header), 1, f) == 1 &&
              fwrite(params.data(), sizeof(float), params.size(), f) == params.size() &&
              fwrite(momentum.data(), sizeof(float), momentum.size(), f) == momentum.size() &&
              fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok) {
        unlink(temp.c_str());
        fail("cannot write %s: %s", temp.c_str(), strerror(errno));
    }
    require(rename(temp.c_str(), path.c_str()) == 0, "cannot rename %s: %s", temp.c_str(), strerror(errno));
    std::string latest = o.out + "/latest.bin", latest_temp = latest + ".tmp";
    unlink(latest_temp.c_str());
    require(symlink(name, latest_temp.c_str()) == 0 && rename(latest_temp.c_str(), latest.c_str()) == 0,
            "cannot update %s: %s", latest.c_str(), strerror(errno));
    fsync_directory(o.out);

    std::vector<std::string> old;  // names of one length sort by step
    for (const std::string& other : list_folder(o.out))
        if (is_checkpoint_name(other) && other.size() == strlen(name)) old.push_back(other);
    std::sort(old.begin(), old.end());
    for (size_t i = 0; i + o.keep < old.size(); i++)
        if (old[i] != name) unlink((o.out + "/" + old[i]).c_str());
    return path;
}

// --- 13e. The run: train, or evaluate a checkpoint

// Everything after the command line: open the data (and the checkpoint), check them,
// build the model, then train or evaluate. Nothing is written before the inputs are
// checked; once log.txt is open, the error that ends a run is also written there.
static void run(Options& o) {
    require(!o.data.empty(), "--data DIR is required (a folder written by `python alexnet.py prepare`)");
    struct stat st;
    require(stat(o.data.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "--data %s: no such folder", o.data.c_str());
    Dataset train(o.data, "train"), val(o.data, "val");
    require(o.eval_only || train.count > 0, "%s holds no training shards (train_000.bin)", o.data.c_str());
    require(!o.eval_only || val.count > 0, "%s holds no validation shards (val_000.bin)", o.data.c_str());
    const Dataset& any = train.count > 0 ? train : val;
    if (train.count > 0 && val.count > 0)
        require(val.H == train.H && val.W == train.W && val.classes == train.classes,
                "%s: the validation shards (%dx%d, %d classes) do not match the training shards (%dx%d, %d classes)",
                o.data.c_str(), val.H, val.W, val.classes, train.H, train.W, train.classes);
    Stats stats(o.data, any.H, any.W);

    TrainState state;
    std::unique_ptr<Checkpoint> checkpoint;
    Arch arch;
    if (!o.resume.empty()) {
        checkpoint.reset(new Checkpoint(o.resume, o, state));
        arch = checkpoint->arch;
        require(arch.classes == any.classes, "%s has %d classes, the dataset %d", o.resume.c_str(),
                arch.classes, any.classes);
        require(checkpoint->image_h == 0 || (checkpoint->image_h == any.H && checkpoint->image_w == any.W),
                "%s was trained on %dx%d images, the dataset has %dx%d", o.resume.c_str(), checkpoint->image_h,
                checkpoint->image_w, any.H, any.W);
    } else {
        require(!o.eval_only, "--eval needs a checkpoint: --resume FILE");
        arch = find_preset(o.arch.c_str());
        arch.classes = any.classes;
        const char* const* defaults = recipe_of(arch).flag_defaults;
        for (int i = 0; i < 4 && defaults[i]; i += 2)
            if (!o.given.count(defaults[i])) set_option(o, defaults[i], defaults[i + 1]);
        std::string fits;  // the presets whose crops fit the images
        for (int p = 0; p < NUM_PRESETS; p++)
            if (PRESETS[p].crop <= any.H && PRESETS[p].crop <= any.W) fits += std::string(" --arch ") + PRESET_NAMES[p];
        require(arch.crop <= any.H && arch.crop <= any.W, "the %s preset crops %dx%d, larger than the %dx%d images%s%s",
                PRESET_NAMES[arch.preset], arch.crop, arch.crop, any.H, any.W, fits.empty() ? "" : "; try",
                fits.c_str());
    }
    require(o.eval_only || o.batch <= train.count, "batch size %d is larger than the training set (%ld images)",
            o.batch, train.count);
    int devices[NUM_TOWERS] = {o.devices[0], o.devices.back()};
    Model model(arch, o.batch, any.H, any.W, o.dropout, o.precision, devices);
    model.set_statistics(stats.mean.data(), stats.eigval, stats.eigvec);
    if (checkpoint) model.upload_state(checkpoint->parameters(), checkpoint->momentum());
    else model.init_params(o.seed);
    checkpoint.reset();

    Log log;
    if (o.eval_only) {
        Loader loader(val, o.batch, arch, false, false, o.seed);
        ViewEvaluation v = evaluate_ten_views(model, loader);
        for (const Evaluation* e : {&v.centre, &v.ten})
            log("eval %s | step %ld | %s | val loss %.4f | top-1 error %.4f | top-5 error %.4f | %ld images",
                o.resume.c_str(), state.step, e == &v.centre ? "centre crop" : "10 views", e->loss,
                e->top1_error, e->top5_error, e->images);
        return;
    }

    Loader loader(train, o.batch, arch, true, o.augment, o.seed);
    if (o.bench > 0) {
        benchmark(model, loader, o, log);
        return;
    }
    std::unique_ptr<Loader> val_loader;
    if (val.count > 0) val_loader.reset(new Loader(val, o.batch, arch, false, false, o.seed));

    require(mkdir(o.out.c_str(), 0777) == 0 || errno == EEXIST, "cannot create %s: %s", o.out.c_str(), strerror(errno));
    lock_output(o.out);
    log.open(o.out + "/log.txt");
    remove_stale_temporaries(o.out, log);
    try {
        train_loop(model, loader, val_loader.get(), o, state, log);
    } catch (const std::exception& e) {
        log.to_file("error: %s", e.what());  // main prints it to stderr
        throw;
    }
}

// ----------------------------------------------------------------------------
// 14. main

// Fails with one clear line when no CUDA device is usable: the GPU build without a GPU
// (or without a driver, which CUDA reports as an "insufficient driver").
static void require_a_device(const char* cpu_build) {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
        cudaGetLastError();
        fail("no CUDA device found; use %s", cpu_build);
    }
}

// Every flag: name, argument, default (as shown by --help), help, and how it sets Options.
struct Flag {
    const char* name;
    const char* arg;  // NULL: a switch
    const char* fallback;  // the default as --help shows it; NULL: the flag is required
    const char* help;
    void (*set)(Options&, const char* flag, const char* value);
};

static long parse_long(const char* flag, const char* text, long lo, long hi) {
    char* end = nullptr;
    errno = 0;
    long v = strtol(text, &end, 10);
    require(*text && *end == 0 && errno == 0 && v >= lo && v <= hi,
            "%s: expected an integer in [%ld, %ld], got '%s'", flag, lo, hi, text);
    return v;
}

static float parse_float(const char* flag, const char* text, double lo, double hi, bool open_hi) {
    char* end = nullptr;
    errno = 0;
    const double v = strtod(text, &end);
    // Compared as the float32 that is used and stored: a checkpoint's 1e-12 reads back as
    // 9.99999996e-13, which must pass the bound 1e-12 again on resume.
    const float f = (float)v;
    require(*text && *end == 0 && errno == 0 && std::isfinite(f) && f >= (float)lo &&
                (open_hi ? f < (float)hi : f <= (float)hi),
            "%s: expected a number in [%g, %g%s, got '%s'", flag, lo, hi, open_hi ? ")" : "]", text);
    return f;
}

static Precision parse_precision(const char* flag, const char* text) {
    for (int p = 0; p < NUM_PRECISIONS; p++)
        if (!strcmp(text, PRECISION_NAMES[p])) return (Precision)p;
    fail("%s: expected fp32, tf32 or bf16, got '%s'", flag, text);
}

static std::vector<int> parse_list(const char* flag, const char* text, long lo, long hi) {
    std::vector<int> values;
    std::string item;
    for (const char* p = text;; p++) {
        if (*p == ',' || *p == 0) {
            values.push_back((int)parse_long(flag, item.c_str(), lo, hi));
            item.clear();
            if (*p == 0) break;
        } else {
            item += *p;
        }
    }
    return values;
}

static const Flag FLAGS[] = {
    {"--data", "DIR", nullptr, "dataset folder written by `python alexnet.py prepare`",
     [](Options& o, const char*, const char* v) { o.data = v; }},
    {"--arch", "NAME", "alexnet",
     "preset: alexnet (the paper, 224x224 crops), alexnet-2012-code (the authors' own 2012 run) or small (28x28 "
     "crops of 32x32 images)",
     [](Options& o, const char*, const char* v) { find_preset(v); o.arch = v; }},
    {"--resume", "FILE", "none", "continue from a checkpoint (its options apply unless given here)",
     [](Options& o, const char*, const char* v) { o.resume = v; }},
    {"--out", "DIR", "out", "output folder: log.txt, ckpt_NNNNNNNN.bin, latest.bin",
     [](Options& o, const char*, const char* v) { o.out = v; }},
    {"--batch", "N", "128", "images per SGD step",
     [](Options& o, const char* f, const char* v) { o.batch = (int)parse_long(f, v, 1, 1 << 16); }},
    {"--lr", "X", "0.01", "learning rate",
     [](Options& o, const char* f, const char* v) { o.lr = parse_float(f, v, 1e-12, 100, false); }},
    {"--momentum", "X", "0.9", "momentum",
     [](Options& o, const char* f, const char* v) { o.momentum = parse_float(f, v, 0, 1, true); }},
    {"--weight-decay", "X", "0.0005", "weight decay (weights only, not biases)",
     [](Options& o, const char* f, const char* v) { o.weight_decay = parse_float(f, v, 0, 1, false); }},
    {"--dropout", "P", "0.5", "dropout probability in fc6 and fc7",
     [](Options& o, const char* f, const char* v) { o.dropout = parse_float(f, v, 0, 1, true); }},
    {"--precision", "P", "fp32",
     "matrix products: fp32 (the paper's arithmetic), or tf32 / bf16 on tensor cores (sm_80 or later), "
     "summed in fp32; weights, gradients and the update stay fp32",
     [](Options& o, const char* f, const char* v) { o.precision = parse_precision(f, v); }},
    {"--epochs", "N", "90", "train for N epochs",
     [](Options& o, const char* f, const char* v) { o.epochs = parse_long(f, v, 1, 1000000); }},
    {"--steps", "N", "0", "stop when the step counter reaches N (0: no limit)",
     [](Options& o, const char* f, const char* v) { o.steps = parse_long(f, v, 0, INT32_MAX); }},
    {"--seed", "N", "1", "seed of the initialisation, shuffles, augmentation and dropout",
     [](Options& o, const char* f, const char* v) { o.seed = (uint64_t)parse_long(f, v, 0, LONG_MAX); }},
    {"--no-augment", nullptr, "off", "train on centre crops: no random crop, flip or lighting",
     [](Options& o, const char*, const char*) { o.augment = false; }},
    {"--eval-every", "N", "0", "validate every N steps (0: once per epoch)",
     [](Options& o, const char* f, const char* v) { o.eval_every = parse_long(f, v, 0, INT32_MAX); }},
    {"--save-every", "N", "1000", "checkpoint every N steps (0: only at the end); always at the end and on Ctrl-C",
     [](Options& o, const char* f, const char* v) { o.save_every = parse_long(f, v, 0, INT32_MAX); }},
    {"--keep", "K", "3", "keep the newest K checkpoints",
     [](Options& o, const char* f, const char* v) { o.keep = (int)parse_long(f, v, 1, 1000000); }},
    {"--log-every", "N", "10", "log a line every N steps",
     [](Options& o, const char* f, const char* v) { o.log_every = (int)parse_long(f, v, 1, INT32_MAX); }},
    {"--patience", "N", "3", "divide the learning rate by 10 after N validations without a better top-1 error (0: never)",
     [](Options& o, const char* f, const char* v) { o.patience = (int)parse_long(f, v, 0, 1000000); }},
    {"--max-drops", "N", "3", "divide the learning rate at most N times in all",
     [](Options& o, const char* f, const char* v) { o.max_drops = (int)parse_long(f, v, 0, 100); }},
    {"--lr-steps", "LIST", "none", "also divide the learning rate by 10 at these epochs, e.g. 25,51",
     [](Options& o, const char* f, const char* v) {
         o.lr_steps = parse_list(f, v, 1, 1000000);
         require(o.lr_steps.size() <= MAX_LR_STEPS, "%s: at most %d epochs", f, (int)MAX_LR_STEPS);
     }},
    {"--devices", "LIST", "0,1 (0 with one device)", "devices of tower 0 and tower 1; one entry puts both towers on it",
     [](Options& o, const char* f, const char* v) {
         o.devices = parse_list(f, v, 0, 1023);
         require(o.devices.size() <= NUM_TOWERS, "%s: at most 2 devices, got '%s'", f, v);
     }},
    {"--eval", nullptr, "off", "evaluate the --resume checkpoint on the validation set and exit",
     [](Options& o, const char*, const char*) { o.eval_only = true; }},
    {"--bench", "N", "0", "time N training steps on one batch kept on the device, print images/s and exit",
     [](Options& o, const char* f, const char* v) { o.bench = parse_long(f, v, 1, INT32_MAX); }},
};

static void print_help(const char* program) {
    printf("usage: %s --data DIR [options]\n\n"
           "Trains the two-tower AlexNet of Krizhevsky et al. (2012) with SGD.\n\noptions:\n", program);
    for (const Flag& f : FLAGS) {
        char left[64];
        snprintf(left, sizeof(left), "%s%s%s", f.name, f.arg ? " " : "", f.arg ? f.arg : "");
        if (f.fallback) printf("  %-20s %s (default: %s)\n", left, f.help, f.fallback);
        else printf("  %-20s %s (required)\n", left, f.help);
    }
    printf("  %-20s this message\n", "--help");
}

static const Flag* find_flag(const std::string& name) {
    for (const Flag& f : FLAGS)
        if (name == f.name) return &f;
    return nullptr;
}

static void set_option(Options& o, const char* flag, const char* value) {
    const Flag* f = find_flag(flag);
    require(f, "unknown option %s", flag);
    f->set(o, f->name, value);
}

// The flag a mistyped one was probably meant to be: the nearest by edit distance, if it
// is within two edits (or three for long names), else nullptr.
static const char* closest_flag(const std::string& typed) {
    const char* best = nullptr;
    size_t best_distance = std::max<size_t>(2, typed.size() / 4) + 1;
    for (const Flag& f : FLAGS) {
        const std::string name = f.name;
        std::vector<size_t> row(name.size() + 1);  // Levenshtein, one row at a time
        for (size_t j = 0; j <= name.size(); j++) row[j] = j;
        for (size_t i = 1; i <= typed.size(); i++) {
            size_t diagonal = row[0];
            row[0] = i;
            for (size_t j = 1; j <= name.size(); j++) {
                const size_t up = row[j];
                row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (typed[i - 1] != name[j - 1])});
                diagonal = up;
            }
        }
        if (row[name.size()] < best_distance) best = f.name, best_distance = row[name.size()];
    }
    return best;
}

// Fill o from the command line; false when --help was printed.
static bool parse_args(int argc, char** argv, Options& o) {
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i], value;
        if (arg == "--help" || arg == "-h") {
            print_help(argv[0]);
            return false;
        }
        size_t eq = arg.find('=');
        bool inline_value = arg.rfind("--", 0) == 0 && eq != std::string::npos;
        if (inline_value) value = arg.substr(eq + 1), arg = arg.substr(0, eq);
        const Flag* flag = find_flag(arg);
        if (!flag) {
            const char* guess = closest_flag(arg);
            fail("unknown argument '%s' (%s%s%ssee --help)", argv[i], guess ? "did you mean " : "", guess ? guess : "",
                 guess ? "? " : "");
        }
        if (flag->arg && !inline_value) {
            require(i + 1 < argc, "%s needs a value (%s)", flag->name, flag->arg);
            value = argv[++i];
        }
        require(flag->arg || !inline_value, "%s takes no value", flag->name);
        flag->set(o, flag->name, value.c_str());
        o.given.insert(flag->name);
    }
    return true;
}

#ifndef ALEXNET_NO_MAIN  // dev/bench_kernels.cu includes this file and brings its own main
int main(int argc, char** argv) {
    try {
        Options options;
        if (!parse_args(argc, argv, options)) return 0;
        require_a_device("./train_alexnet_cpu");
        int count = 0;
        cudaCheck(cudaGetDeviceCount(&count));
        if (options.devices.empty()) options.devices = count > 1 ? std::vector<int>{0, 1} : std::vector<int>{0};
        for (int d : options.devices)
            require(d < count, "--devices: device %d does not exist (%d device%s)", d, count, count == 1 ? "" : "s");
        run(options);
        return 0;
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
#endif
