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
// out[n][c][y][x] = img[n][oy+y][ox+x'][c] - mean[oy+y][ox+x'][c] + light[n][c]
//   x' = flip ? crop-1-x : x,   light[n][c] = sum_i alphas[n][i] * eigval[i] * eigvec[c][i]
// (PCA lighting, paper section 4.1; eigvec row-major, column i is eigenvector i).
// One thread per output pixel (n, y, x) doing its three channels: consecutive threads
// read consecutive pixels of an image row and write consecutive floats of each plane.
// The offsets must keep the crop inside the image (the C API checks them on the host).
__global__ void augment_images_kernel(float* __restrict__ out, const uint8_t* __restrict__ images,
                                      const float* __restrict__ mean, const int* __restrict__ offsets,
                                      const uint8_t* __restrict__ flips, const float* __restrict__ alphas,
                                      const float* __restrict__ eigval, const float* __restrict__ eigvec,
                                      int N, int H, int W, int crop) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * crop * crop) return;
    int x = t % crop, y = t / crop % crop, n = t / (crop * crop);
    int sy = offsets[2 * n] + y;
    int sx = offsets[2 * n + 1] + (flips[n] ? crop - 1 - x : x);
    long pixel = ((long)sy * W + sx) * 3;
    const uint8_t* img = images + (long)n * H * W * 3;
    for (int c = 0; c < 3; c++) {
        float light = 0.0f;
        for (int i = 0; i < 3; i++) light += alphas[3 * n + i] * eigval[i] * eigvec[3 * c + i];
        out[((long)(n * 3 + c) * crop + y) * crop + x] = ((float)img[pixel + c] - mean[pixel + c]) + light;
    }
}

static long augment_images_check(int N, int H, int W, int crop) {
    require(N > 0 && H > 0 && W > 0 && crop > 0, "augment_images: sizes must be positive (N=%d H=%d W=%d crop=%d)", N, H, W, crop);
    require(crop <= H && crop <= W, "augment_images: crop %d is larger than the %dx%d image", crop, H, W);
    require((long)N * H * W * 3 <= INT32_MAX, "augment_images: batch too large");
    return (long)N * 3 * crop * crop;
}

void augment_images(float* out, const uint8_t* images, const float* mean, const int* offsets,
                    const uint8_t* flips, const float* alphas, const float* eigval, const float* eigvec,
                    int N, int H, int W, int crop, cudaStream_t stream) {
    augment_images_check(N, H, W, crop);
    const int threads = 256;
    LAUNCH(augment_images_kernel, ceil_div((long)N * crop * crop, threads), threads, 0, stream,
           out, images, mean, offsets, flips, alphas, eigval, eigvec, N, H, W, crop);
}

// ----------------------------------------------------------------------------
// 3. Convolution

// All convolution and fully connected work is one tiled matrix product
//     C[m][n] = sum_k A[m][k] * B[k][n]
// in which A and B are never materialised: a "problem" struct says how element (m, k)
// of A and (k, n) of B are gathered from the tensors (implicit GEMM), and how C is
// stored (bias, ReLU). One core, gemm_tile_kernel, serves all of:
//
//   problem                  rows m        columns n        reduction k
//   conv_forward             out channel   (image, oy, ox)  (in channel, r, s)
//   conv_backward_data       in channel    (image, y, x)    (out channel, r, s)
//   conv_backward_weights    out channel   (in channel,r,s) (image, oy, ox)
//   fc_forward               image         out feature      in feature
//   fc_backward_data         image         in feature       out feature
//   fc_backward_weights      out feature   in feature       image
//
// Thread mapping: a block of 256 threads computes a TILE_M x TILE_N tile of C (64x64,
// or 16x256 when C has at most 16 rows, e.g. fc layers at small batch), each thread a
// 4x4 micro-tile held in registers at rows ty + i*TILE_M/4 and columns tx + j*TILE_N/4,
// so that consecutive threads store consecutive columns and read consecutive
// shared-memory words. The reduction advances in steps of TILE_K (32; 16 for 16x256
// tiles, which keeps B at 16 loads per thread): the block stages a TILE_M x TILE_K
// slice of A and a TILE_K x TILE_N slice of B in shared memory; the next slices are
// fetched into registers while the current ones are multiplied, hiding global-memory
// latency. (Deep slices also mean few barriers per multiply-add, which the CPU
// runtime, switching fibers at every barrier, needs as much as the GPU.)
// blockIdx.z enumerates (split, batch): batches are independent GEMMs (conv groups,
// stride phases), and a long reduction may be split into ranges whose partial
// products a second kernel adds up in a fixed order (deterministic, no atomics).

constexpr int GEMM_THREADS = 256;
constexpr int GEMM_TILE_AREA = 64 * 64;  // TILE_M * TILE_N
constexpr int GEMM_MICRO = 4;            // 4x4 outputs per thread: 256 * 16 = the tile area
constexpr int GEMM_SPLIT_ALIGN = 32;     // split ranges are whole slices of either tile shape

template <int TILE_M>
struct GemmTile {  // the tile's columns and slice depth for TILE_M rows
    static constexpr int N = GEMM_TILE_AREA / TILE_M, K = TILE_M == 16 ? 16 : 32;
};

// Sizes of one GEMM (of each batch) and how its reduction is split.
struct GemmDims {
    int rows, cols, depth;  // C is rows x cols, summed over depth
    int batches;            // independent GEMMs of these sizes
    int splits;             // the reduction is cut into ranges of depth_per_split
    int depth_per_split;    // a multiple of GEMM_SPLIT_ALIGN
};

static GemmDims gemm_dims(int rows, int cols, int depth, int batches, int splits) {
    int slices = ceil_div(depth, GEMM_SPLIT_ALIGN);
    int slices_per_split = ceil_div(slices, splits);
    // recount, so that no split is left with an empty range
    return GemmDims{rows, cols, depth, batches, ceil_div(slices, slices_per_split),
                    slices_per_split * GEMM_SPLIT_ALIGN};
}

// Which operand index is consecutive in memory decides how a block's threads walk a
// TILE x TILE_K slice: along k (thread t takes k = t % TILE_K) or along m/n (t takes
// m = t % TILE), so that neighbouring threads read neighbouring addresses.
// Load i of thread t (i < TILE * TILE_K / GEMM_THREADS) is element (mn, k).
template <int TILE, int TILE_K, bool K_CONTIGUOUS>
struct TileWalk {
    static constexpr int loads = TILE * TILE_K / GEMM_THREADS;
    static __device__ __forceinline__ int mn(int tid, int i) {
        return K_CONTIGUOUS ? tid / TILE_K + i * (GEMM_THREADS / TILE_K) : tid % TILE;
    }
    static __device__ __forceinline__ int k(int tid, int i) {
        return K_CONTIGUOUS ? tid % TILE_K : tid / TILE + i * (GEMM_THREADS / TILE);
    }
};

// f(0), ..., f(N-1) with constant arguments, so that small register arrays stay in
// registers under any compiler (g++ -O2 keeps loop-indexed arrays in memory).
template <int N, typename F>
__device__ __forceinline__ void unrolled(F&& f) {
    if constexpr (N > 0) {
        unrolled<N - 1>(f);
        f(N - 1);
    }
}

// A Problem provides: GemmDims dims; the flags a_k_contiguous, b_k_contiguous and
// row_sums; a(batch, m, k) and b(batch, k, n) for in-range indices; store(batch, split,
// m, n, value); and, when row_sums is set, store_row_sum(batch, split, m, value), which
// receives sum_k A[m][k] over the split's range (the bias gradient: when A is the output
// gradient, the bias is a weight whose input is always 1).
template <int TILE_M, typename Problem>
__global__ void __launch_bounds__(GEMM_THREADS, 2) gemm_tile_kernel(Problem p) {
    constexpr int TILE_N = GemmTile<TILE_M>::N, TILE_K = GemmTile<TILE_M>::K;
    constexpr int STEP_M = TILE_M / GEMM_MICRO, STEP_N = TILE_N / GEMM_MICRO;
    using WalkA = TileWalk<TILE_M, TILE_K, Problem::a_k_contiguous>;
    using WalkB = TileWalk<TILE_N, TILE_K, Problem::b_k_contiguous>;
    // row stride TILE + 32/TILE_K: a warp of the k-contiguous walk stores TILE_K rows
    // x 32/TILE_K columns, which then land in 32 distinct banks
    constexpr int PAD = 32 / TILE_K;
    SHARED(float, a_tile, [TILE_K][TILE_M + PAD]);
    SHARED(float, b_tile, [TILE_K][TILE_N + PAD]);
    const GemmDims d = p.dims;
    const int tid = threadIdx.x, tx = tid % STEP_N, ty = tid / STEP_N;
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    const int batch = blockIdx.z % d.batches, split = blockIdx.z / d.batches;
    const int k_begin = split * d.depth_per_split;
    const int k_end = k_begin + d.depth_per_split < d.depth ? k_begin + d.depth_per_split : d.depth;
    const bool sums_rows = Problem::row_sums && blockIdx.x == 0 && tx == 0;

    float a_next[WalkA::loads], b_next[WalkB::loads];
    auto fetch = [&](int k0) {  // slices [k0, k0 + TILE_K) into registers, zeros outside
        for (int i = 0; i < WalkA::loads; i++) {
            int m = m0 + WalkA::mn(tid, i), k = k0 + WalkA::k(tid, i);
            a_next[i] = (m < d.rows && k < k_end) ? p.a(batch, m, k) : 0.0f;
        }
        for (int i = 0; i < WalkB::loads; i++) {
            int n = n0 + WalkB::mn(tid, i), k = k0 + WalkB::k(tid, i);
            b_next[i] = (n < d.cols && k < k_end) ? p.b(batch, k, n) : 0.0f;
        }
    };

    float acc[GEMM_MICRO][GEMM_MICRO] = {};
    float row_sum[GEMM_MICRO] = {};
    fetch(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        for (int i = 0; i < WalkA::loads; i++)
            a_tile[WalkA::k(tid, i)][WalkA::mn(tid, i)] = a_next[i];
        for (int i = 0; i < WalkB::loads; i++)
            b_tile[WalkB::k(tid, i)][WalkB::mn(tid, i)] = b_next[i];
        __syncthreads();
        if (k0 + TILE_K < k_end) fetch(k0 + TILE_K);
        for (int kk = 0; kk < TILE_K; kk++) {
            float a_frag[GEMM_MICRO], b_frag[GEMM_MICRO];
            unrolled<GEMM_MICRO>([&](int i) {
                a_frag[i] = a_tile[kk][ty + i * STEP_M];
                b_frag[i] = b_tile[kk][tx + i * STEP_N];
            });
            unrolled<GEMM_MICRO>([&](int i) {
                unrolled<GEMM_MICRO>([&](int j) { acc[i][j] += a_frag[i] * b_frag[j]; });
                if (sums_rows) row_sum[i] += a_frag[i];
            });
        }
        __syncthreads();
    }

    for (int i = 0; i < GEMM_MICRO; i++) {
        int m = m0 + ty + i * STEP_M;
        if (m >= d.rows) continue;
        for (int j = 0; j < GEMM_MICRO; j++) {
            int n = n0 + tx + j * STEP_N;
            if (n < d.cols) p.store(batch, split, m, n, acc[i][j]);
        }
        if constexpr (Problem::row_sums)
            if (sums_rows) p.store_row_sum(batch, split, m, row_sum[i]);
    }
}

// Skinny products (at most 16 rows) take 16x256 tiles, the rest 64x64.
static int gemm_tile_rows(int rows) { return rows <= 16 ? 16 : 64; }

template <int TILE_M, typename Problem>
static void gemm_launch_tiles(const Problem& p, cudaStream_t stream) {
    const GemmDims& d = p.dims;
    require(ceil_div(d.rows, TILE_M) <= 65535 && (long)d.batches * d.splits <= 65535,
            "gemm: grid too large (%d rows, %d batches x splits)", d.rows, d.batches * d.splits);
    dim3 grid(ceil_div(d.cols, GemmTile<TILE_M>::N), ceil_div(d.rows, TILE_M),
              d.batches * d.splits);
    LAUNCH((gemm_tile_kernel<TILE_M, Problem>), grid, GEMM_THREADS, 0, stream, p);
}

template <typename Problem>
static void gemm_launch(const Problem& p, cudaStream_t stream) {
    if (gemm_tile_rows(p.dims.rows) == 16) gemm_launch_tiles<16>(p, stream);
    else gemm_launch_tiles<64>(p, stream);
}

// Output element [i] of a split reduction: the sum of the splits' partial results,
// always added in split order. Thread i handles element i (coalesced across splits).
// The first n_first elements go to first[], the rest to second[].
__global__ void split_sum_kernel(float* first, float* second, const float* partial,
                                 int n_first, int n_total, int splits) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_total) return;
    float sum = 0.0f;
    for (int s = 0; s < splits; s++) sum += partial[(long)s * n_total + i];
    if (i < n_first) first[i] = sum;
    else second[i - n_first] = sum;
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

    // im2col: element ((c, r, s), (image, oy, ox)) of the unrolled input of group g
    __device__ float unrolled_input(const float* inp, int g, int crs, int pixel) const {
        int image = pixel / (OH * OW), opix = pixel % (OH * OW);
        int c = crs / (R * S), rs = crs % (R * S);
        int y = (opix / OW) * stride - pad + rs / S;
        int x = (opix % OW) * stride - pad + rs % S;
        if (y < 0 || y >= H || x < 0 || x >= W) return 0.0f;
        return inp[(((long)image * C + g * cg() + c) * H + y) * W + x];
    }
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

// Forward: out[n][k][oy][ox] = [relu](bias[k] + sum_{c,r,s} w[k][c][r][s] *
// inp[n][g*C/groups + c][oy*stride - pad + r][ox*stride - pad + s]), g = k's group.
// GEMM per group: A = the group's weights [K/groups][C/groups*R*S] (rows contiguous),
// B = the unrolled input, gathered on the fly (consecutive columns are neighbouring
// output pixels, hence neighbouring input pixels).
struct ConvForward {
    GemmDims dims;
    ConvShape s;
    float* out;
    const float *inp, *weight, *bias;
    bool relu;
    static constexpr bool a_k_contiguous = true, b_k_contiguous = false, row_sums = false;

    __device__ float a(int g, int m, int k) const {
        return weight[((long)g * s.kg() + m) * dims.depth + k];
    }
    __device__ float b(int g, int k, int n) const { return s.unrolled_input(inp, g, k, n); }
    __device__ void store(int g, int split, int m, int n, float v) const {
        int k = g * s.kg() + m, image = n / (s.OH * s.OW), opix = n % (s.OH * s.OW);
        v += bias[k];
        out[((long)image * s.K + k) * s.OH * s.OW + opix] = relu ? fmaxf(v, 0.0f) : v;
    }
};

void conv_forward(float* out, const float* inp, const float* weight, const float* bias,
                  int N, int C, int H, int W, int K, int R, int S, int stride, int pad,
                  int groups, int OH, int OW, bool relu, cudaStream_t stream) {
    ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
    conv_check_shape(s);
    GemmDims d = gemm_dims(s.kg(), N * OH * OW, s.cg() * R * S, groups, 1);
    gemm_launch(ConvForward{d, s, out, inp, weight, bias, relu}, stream);
}

// Backward data: dinp[n][c][y][x] = sum over filters k of c's group and taps (r, s)
// with y = oy*stride - pad + r, x = ox*stride - pad + s for an output pixel (oy, ox)
// of dout[n][k][oy][ox] * w[k][c][r][s].
// Only taps with r = (y + pad) mod stride (+ multiples of stride) reach pixel y, so the
// pixels are split into stride x stride phases (py, px) = ((y+pad) % stride,
// (x+pad) % stride); within a phase every pixel uses the same ceil(R/stride) x
// ceil(S/stride) taps and the product is dense (conv1: 16x less work than gathering
// zeros). GEMM per (phase, group): rows = input channels, columns = the phase's pixels
// (image, i, j) with y = y0 + i*stride, reduction over (k, tap); B gathers
// dout[n][k][oy0 + i - jr][ox0 + j - js] for tap r = py + jr*stride, or 0 outside.
// Pixels that no window covers get 0.
struct ConvBackwardData {
    GemmDims dims;
    ConvShape s;
    float* dinp;
    const float *dout, *weight;
    int phase_h, phase_w, taps_r, taps_s;  // pixels and taps of a phase, along y and x
    static constexpr bool a_k_contiguous = true, b_k_contiguous = false, row_sums = false;

    // Phase py's first pixel y0 (smallest y >= 0 with (y + pad) % stride == py) and the
    // output row oy0 that its tap py reads.
    __device__ int first_pixel(int phase) const {
        return ((phase - s.pad) % s.stride + s.stride) % s.stride;
    }
    __device__ float a(int batch, int m, int k) const {  // w[k's filter][m][k's tap]
        int g = batch % s.groups, phase = batch / s.groups;
        int filter = k / (taps_r * taps_s), tap = k % (taps_r * taps_s);
        int r = phase / s.stride + tap / taps_s * s.stride;
        int c = phase % s.stride + tap % taps_s * s.stride;
        if (r >= s.R || c >= s.S) return 0.0f;
        return weight[(((long)g * s.kg() + filter) * s.cg() + m) * s.R * s.S + r * s.S + c];
    }
    __device__ float b(int batch, int k, int n) const {
        int g = batch % s.groups, phase = batch / s.groups;
        int py = phase / s.stride, px = phase % s.stride;
        int filter = k / (taps_r * taps_s), tap = k % (taps_r * taps_s);
        int image = n / (phase_h * phase_w), pix = n % (phase_h * phase_w);
        int oy = (first_pixel(py) + s.pad - py) / s.stride + pix / phase_w - tap / taps_s;
        int ox = (first_pixel(px) + s.pad - px) / s.stride + pix % phase_w - tap % taps_s;
        if (oy < 0 || oy >= s.OH || ox < 0 || ox >= s.OW) return 0.0f;
        return dout[(((long)image * s.K + g * s.kg() + filter) * s.OH + oy) * s.OW + ox];
    }
    __device__ void store(int batch, int split, int m, int n, float v) const {
        int g = batch % s.groups, phase = batch / s.groups;
        int image = n / (phase_h * phase_w), pix = n % (phase_h * phase_w);
        int y = first_pixel(phase / s.stride) + pix / phase_w * s.stride;
        int x = first_pixel(phase % s.stride) + pix % phase_w * s.stride;
        if (y < s.H && x < s.W)
            dinp[(((long)image * s.C + g * s.cg() + m) * s.H + y) * s.W + x] = v;
    }
};

void conv_backward_data(float* dinp, const float* dout, const float* weight,
                        int N, int C, int H, int W, int K, int R, int S, int stride, int pad,
                        int groups, int OH, int OW, cudaStream_t stream) {
    ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
    conv_check_shape(s);
    int phase_h = ceil_div(H, stride), phase_w = ceil_div(W, stride);
    int taps_r = ceil_div(R, stride), taps_s = ceil_div(S, stride);
    require((long)groups * stride * stride <= 65535, "conv_backward_data: stride %d too large",
            stride);
    GemmDims d = gemm_dims(s.cg(), N * phase_h * phase_w, s.kg() * taps_r * taps_s,
                           groups * stride * stride, 1);
    gemm_launch(ConvBackwardData{d, s, dinp, dout, weight, phase_h, phase_w, taps_r, taps_s},
                stream);
}

// Backward weights and bias: dw[k][c][r][s] = sum_{n,oy,ox} dout[n][k][oy][ox] *
// inp[n][g*C/groups + c][oy*stride - pad + r][ox*stride - pad + s] and
// db[k] = sum_{n,oy,ox} dout[n][k][oy][ox]. GEMM per group: A = the output gradient
// [K/groups][N*OH*OW], B = the unrolled input transposed; both are read along the
// reduction (output pixels). The bias gradient is the row sum of A, taken by the
// blocks of the first column tile. The reduction is long (conv1: 55*55*N) and the
// output small, so it is split until the grid has about GEMM_TARGET_BLOCKS blocks;
// split p writes its partial dw and db to workspace[p] = [K*C/groups*R*S + K] floats
// and split_sum_kernel adds them in split order.
constexpr int GEMM_TARGET_BLOCKS = 264;          // two waves of 132 SMs (H100)
constexpr int GEMM_MIN_DEPTH_PER_SPLIT = 1024;  // keep the split partial sums long

struct ConvBackwardWeights {
    GemmDims dims;
    ConvShape s;
    float *dweight, *dbias;  // split p writes dweight + p*split_stride, dbias + p*split_stride
    long split_stride;
    const float *dout, *inp;
    static constexpr bool a_k_contiguous = true, b_k_contiguous = true, row_sums = true;

    __device__ float a(int g, int m, int k) const {
        int image = k / (s.OH * s.OW), opix = k % (s.OH * s.OW);
        return dout[((long)image * s.K + g * s.kg() + m) * s.OH * s.OW + opix];
    }
    __device__ float b(int g, int k, int n) const { return s.unrolled_input(inp, g, n, k); }
    __device__ void store(int g, int split, int m, int n, float v) const {
        dweight[split * split_stride + ((long)g * s.kg() + m) * dims.cols + n] = v;
    }
    __device__ void store_row_sum(int g, int split, int m, float v) const {
        dbias[split * split_stride + g * s.kg() + m] = v;
    }
};

static GemmDims conv_backward_weights_dims(const ConvShape& s) {
    int rows = s.kg(), cols = s.cg() * s.R * s.S, depth = s.N * s.OH * s.OW;
    int tile_rows = gemm_tile_rows(rows);
    int tiles = ceil_div(rows, tile_rows) * ceil_div(cols, GEMM_TILE_AREA / tile_rows) * s.groups;
    int splits = ceil_div(GEMM_TARGET_BLOCKS, tiles);
    if (splits > depth / GEMM_MIN_DEPTH_PER_SPLIT) splits = depth / GEMM_MIN_DEPTH_PER_SPLIT;
    return gemm_dims(rows, cols, depth, s.groups, splits > 1 ? splits : 1);
}

// Floats of workspace conv_backward_weights needs for these dims (0: none).
size_t conv_backward_weights_workspace(int N, int C, int H, int W, int K, int R, int S,
                                       int stride, int pad, int groups, int OH, int OW) {
    ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
    conv_check_shape(s);
    GemmDims d = conv_backward_weights_dims(s);
    return d.splits > 1 ? (size_t)d.splits * ((size_t)K * d.cols + K) : 0;
}

void conv_backward_weights(float* dweight, float* dbias, const float* dout, const float* inp,
                           int N, int C, int H, int W, int K, int R, int S, int stride,
                           int pad, int groups, int OH, int OW, float* workspace,
                           cudaStream_t stream) {
    ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
    conv_check_shape(s);
    GemmDims d = conv_backward_weights_dims(s);
    int n_weight = K * d.cols;
    if (d.splits == 1) {
        gemm_launch(ConvBackwardWeights{d, s, dweight, dbias, 0, dout, inp}, stream);
        return;
    }
    require(workspace != nullptr, "conv_backward_weights: needs a workspace of %zu floats",
            conv_backward_weights_workspace(N, C, H, W, K, R, S, stride, pad, groups, OH, OW));
    gemm_launch(ConvBackwardWeights{d, s, workspace, workspace + n_weight, n_weight + K, dout, inp},
                stream);
    LAUNCH(split_sum_kernel, ceil_div(n_weight + K, 256), 256, 0, stream,
           dweight, dbias, workspace, n_weight, n_weight + K, d.splits);
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
// 5. Local response normalisation (across channels)
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
// inp [N][in], weight [out][in], bias [out], out [N][out].
//
// Forward: out[n][o] = [relu](bias[o] + sum_i inp[n][i] * w[o][i]).
// GEMM rows = images, columns = output features; A = inp and B = w transposed are
// both read along the reduction (rows of inp and of w are contiguous).
struct FcForward {
    GemmDims dims;
    float* out;
    const float *inp, *weight, *bias;
    bool relu;
    static constexpr bool a_k_contiguous = true, b_k_contiguous = true, row_sums = false;

    __device__ float a(int, int m, int k) const { return inp[(long)m * dims.depth + k]; }
    __device__ float b(int, int k, int n) const { return weight[(long)n * dims.depth + k]; }
    __device__ void store(int, int, int m, int n, float v) const {
        v += bias[n];
        out[(long)m * dims.cols + n] = relu ? fmaxf(v, 0.0f) : v;
    }
};

static void fc_check_shape(int N, int in, int out_features) {
    require(N > 0 && in > 0 && out_features > 0,
            "fc: sizes must be positive (N=%d in=%d out=%d)", N, in, out_features);
    require((double)N * in <= INT32_MAX && (double)N * out_features <= INT32_MAX
            && (double)in * out_features <= INT32_MAX,
            "fc: tensors over 2^31 elements are not supported");
}

void fc_forward(float* out, const float* inp, const float* weight, const float* bias,
                int N, int in, int out_features, bool relu, cudaStream_t stream) {
    fc_check_shape(N, in, out_features);
    gemm_launch(FcForward{gemm_dims(N, out_features, in, 1, 1), out, inp, weight, bias, relu},
                stream);
}

// Backward data: dinp[n][i] = sum_o dout[n][o] * w[o][i].
// GEMM rows = images, columns = input features, reduction over output features;
// A = dout is read along the reduction, B = w along the columns.
struct FcBackwardData {
    GemmDims dims;
    float* dinp;
    const float *dout, *weight;
    static constexpr bool a_k_contiguous = true, b_k_contiguous = false, row_sums = false;

    __device__ float a(int, int m, int k) const { return dout[(long)m * dims.depth + k]; }
    __device__ float b(int, int k, int n) const { return weight[(long)k * dims.cols + n]; }
    __device__ void store(int, int, int m, int n, float v) const {
        dinp[(long)m * dims.cols + n] = v;
    }
};

void fc_backward_data(float* dinp, const float* dout, const float* weight, int N, int in,
                      int out_features, cudaStream_t stream) {
    fc_check_shape(N, in, out_features);
    gemm_launch(FcBackwardData{gemm_dims(N, in, out_features, 1, 1), dinp, dout, weight}, stream);
}

// Backward weights and bias: dw[o][i] = sum_n dout[n][o] * inp[n][i] and
// db[o] = sum_n dout[n][o], the row sums of A = dout transposed.
// GEMM rows = output features, columns = input features, reduction over the batch;
// A and B are both read along their rows/columns (a batch row is contiguous). The
// reduction is only N long and the output large, so it is never split.
struct FcBackwardWeights {
    GemmDims dims;
    float *dweight, *dbias;
    const float *dout, *inp;
    static constexpr bool a_k_contiguous = false, b_k_contiguous = false, row_sums = true;

    __device__ float a(int, int m, int k) const { return dout[(long)k * dims.rows + m]; }
    __device__ float b(int, int k, int n) const { return inp[(long)k * dims.cols + n]; }
    __device__ void store(int, int, int m, int n, float v) const {
        dweight[(long)m * dims.cols + n] = v;
    }
    __device__ void store_row_sum(int, int, int m, float v) const { dbias[m] = v; }
};

void fc_backward_weights(float* dweight, float* dbias, const float* dout, const float* inp,
                         int N, int in, int out_features, cudaStream_t stream) {
    fc_check_shape(N, in, out_features);
    gemm_launch(FcBackwardWeights{gemm_dims(out_features, in, N, 1, 1), dweight, dbias, dout, inp},
                stream);
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
// top-1 correct iff rank < 1, top-5 iff rank < 5. Reductions: warp shuffles, then one
// partial per warp in shared memory, combined in a fixed order (deterministic).

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
    int above = 0;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
        above += x[j] > target || (x[j] == target && j < label);
        if (dlogits) dlogits[(long)blockIdx.x * K + j] = (expf(x[j] - m) / s - (j == label ? 1.0f : 0.0f)) / N;
    }
    int rank = block_reduce(above, counts, SumOp());
    if (threadIdx.x == 0) {
        losses[blockIdx.x] = logf(s) + m - target;
        if (correct && valid) {  // integer atomics: exact and order-independent
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
// Shapes are checked (conv_check_shape / fc_check_shape) before anything is allocated.

static long conv_input_size(const ConvShape& s) { return (long)s.N * s.C * s.H * s.W; }
static long conv_output_size(const ConvShape& s) { return (long)s.N * s.K * s.OH * s.OW; }
static long conv_weight_size(const ConvShape& s) { return (long)s.K * s.cg() * s.R * s.S; }

extern "C" int alexnet_conv_forward(float* out, const float* inp, const float* weight,
                                    const float* bias, int N, int C, int H, int W, int K, int R,
                                    int S, int stride, int pad, int groups, int OH, int OW,
                                    int relu) {
    return api_call([&] {
        ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
        conv_check_shape(s);
        require(out && inp && weight && bias, "conv_forward: null pointer argument");
        DeviceArray<float> d_out(conv_output_size(s)), d_inp(inp, conv_input_size(s)),
            d_weight(weight, conv_weight_size(s)), d_bias(bias, K);
        conv_forward(d_out.ptr, d_inp.ptr, d_weight.ptr, d_bias.ptr, N, C, H, W, K, R, S, stride,
                     pad, groups, OH, OW, relu != 0, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_conv_backward_data(float* dinp, const float* dout, const float* weight,
                                          int N, int C, int H, int W, int K, int R, int S,
                                          int stride, int pad, int groups, int OH, int OW) {
    return api_call([&] {
        ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
        conv_check_shape(s);
        require(dinp && dout && weight, "conv_backward_data: null pointer argument");
        DeviceArray<float> d_dinp(conv_input_size(s)), d_dout(dout, conv_output_size(s)),
            d_weight(weight, conv_weight_size(s));
        conv_backward_data(d_dinp.ptr, d_dout.ptr, d_weight.ptr, N, C, H, W, K, R, S, stride, pad,
                           groups, OH, OW, 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_conv_backward_weights(float* dweight, float* dbias, const float* dout,
                                             const float* inp, int N, int C, int H, int W, int K,
                                             int R, int S, int stride, int pad, int groups,
                                             int OH, int OW) {
    return api_call([&] {
        ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
        conv_check_shape(s);
        require(dweight && dbias && dout && inp, "conv_backward_weights: null pointer argument");
        DeviceArray<float> d_dweight(conv_weight_size(s)), d_dbias(K),
            d_dout(dout, conv_output_size(s)), d_inp(inp, conv_input_size(s)),
            workspace(conv_backward_weights_workspace(N, C, H, W, K, R, S, stride, pad, groups,
                                                      OH, OW));
        conv_backward_weights(d_dweight.ptr, d_dbias.ptr, d_dout.ptr, d_inp.ptr, N, C, H, W, K, R,
                              S, stride, pad, groups, OH, OW, workspace.ptr, 0);
        d_dweight.download(dweight);
        d_dbias.download(dbias);
    });
}

extern "C" int alexnet_fc_forward(float* out, const float* inp, const float* weight,
                                  const float* bias, int N, int in, int out_features, int relu) {
    return api_call([&] {
        fc_check_shape(N, in, out_features);
        require(out && inp && weight && bias, "fc_forward: null pointer argument");
        DeviceArray<float> d_out((long)N * out_features), d_inp(inp, (long)N * in),
            d_weight(weight, (long)out_features * in), d_bias(bias, out_features);
        fc_forward(d_out.ptr, d_inp.ptr, d_weight.ptr, d_bias.ptr, N, in, out_features,
                   relu != 0, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_fc_backward_data(float* dinp, const float* dout, const float* weight,
                                        int N, int in, int out_features) {
    return api_call([&] {
        fc_check_shape(N, in, out_features);
        require(dinp && dout && weight, "fc_backward_data: null pointer argument");
        DeviceArray<float> d_dinp((long)N * in), d_dout(dout, (long)N * out_features),
            d_weight(weight, (long)out_features * in);
        fc_backward_data(d_dinp.ptr, d_dout.ptr, d_weight.ptr, N, in, out_features, 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_fc_backward_weights(float* dweight, float* dbias, const float* dout,
                                           const float* inp, int N, int in, int out_features) {
    return api_call([&] {
        fc_check_shape(N, in, out_features);
        require(dweight && dbias && dout && inp, "fc_backward_weights: null pointer argument");
        DeviceArray<float> d_dweight((long)out_features * in), d_dbias(out_features),
            d_dout(dout, (long)N * out_features), d_inp(inp, (long)N * in);
        fc_backward_weights(d_dweight.ptr, d_dbias.ptr, d_dout.ptr, d_inp.ptr, N, in,
                            out_features, 0);
        d_dweight.download(dweight);
        d_dbias.download(dbias);
    });
}

// --- 14b. C API: the other layers

// Every pointer argument must be non-NULL, except the outputs documented as optional.
static void require_pointers(const char* op, std::initializer_list<std::pair<const char*, const void*>> pointers) {
    for (const auto& p : pointers) require(p.second != nullptr, "%s: %s is NULL", op, p.first);
}

// The generator itself (host code path), for the known-answer tests.
extern "C" int alexnet_philox4x32(uint32_t* out, const uint32_t* counter, const uint32_t* key) {
    return api_call([&] {
        require_pointers("philox4x32", {{"out", out}, {"counter", counter}, {"key", key}});
        Philox4 r = philox4x32(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
        memcpy(out, r.word, sizeof(r.word));
    });
}

extern "C" int alexnet_augment_images(float* out, const uint8_t* images, const float* mean,
                                      const int* offsets, const uint8_t* flips, const float* alphas,
                                      const float* eigval, const float* eigvec, int N, int H, int W, int crop) {
    return api_call([&] {
        require_pointers("augment_images", {{"out", out}, {"images", images}, {"mean", mean}, {"offsets", offsets},
                                            {"flips", flips}, {"alphas", alphas}, {"eigval", eigval}, {"eigvec", eigvec}});
        long count = augment_images_check(N, H, W, crop);
        for (int n = 0; n < N; n++) {
            int oy = offsets[2 * n], ox = offsets[2 * n + 1];
            require(oy >= 0 && oy <= H - crop && ox >= 0 && ox <= W - crop,
                    "augment_images: image %d: a %d crop at offset (%d, %d) leaves the %dx%d image", n, crop, oy, ox, H, W);
            require(flips[n] <= 1, "augment_images: image %d: flip must be 0 or 1 (got %d)", n, flips[n]);
        }
        long pixels = (long)H * W * 3;
        DeviceArray<uint8_t> d_images(images, N * pixels);
        DeviceArray<float> d_mean(mean, pixels), d_alphas(alphas, 3 * N), d_eigval(eigval, 3), d_eigvec(eigvec, 9);
        DeviceArray<int> d_offsets(offsets, 2 * N);
        DeviceArray<uint8_t> d_flips(flips, N);
        DeviceArray<float> d_out(count);
        augment_images(d_out.ptr, d_images.ptr, d_mean.ptr, d_offsets.ptr, d_flips.ptr, d_alphas.ptr,
                       d_eigval.ptr, d_eigvec.ptr, N, H, W, crop, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_relu_forward(float* out, const float* inp, long n) {
    return api_call([&] {
        require_pointers("relu_forward", {{"out", out}, {"inp", inp}});
        elementwise_check("relu_forward", n);
        DeviceArray<float> d_inp(inp, n), d_out(n);
        relu_forward(d_out.ptr, d_inp.ptr, n, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_relu_backward(float* dinp, const float* dout, const float* out, long n) {
    return api_call([&] {
        require_pointers("relu_backward", {{"dinp", dinp}, {"dout", dout}, {"out", out}});
        elementwise_check("relu_backward", n);
        DeviceArray<float> d_dout(dout, n), d_out(out, n), d_dinp(n);
        relu_backward(d_dinp.ptr, d_dout.ptr, d_out.ptr, n, 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_lrn_forward(float* out, float* scale, const float* inp, int N, int C, int H, int W,
                                   int size, float alpha, float beta, float k) {
    return api_call([&] {
        require_pointers("lrn_forward", {{"out", out}, {"scale", scale}, {"inp", inp}});
        long count = lrn_check(N, C, H, W, size, alpha, beta, k);
        DeviceArray<float> d_inp(inp, count), d_out(count), d_scale(count);
        lrn_forward(d_out.ptr, d_scale.ptr, d_inp.ptr, N, C, H, W, size, alpha, beta, k, 0);
        d_out.download(out);
        d_scale.download(scale);
    });
}

extern "C" int alexnet_lrn_backward(float* dinp, const float* dout, const float* inp, const float* out,
                                    const float* scale, int N, int C, int H, int W, int size, float alpha,
                                    float beta, float k) {
    return api_call([&] {
        require_pointers("lrn_backward", {{"dinp", dinp}, {"dout", dout}, {"inp", inp}, {"out", out}, {"scale", scale}});
        long count = lrn_check(N, C, H, W, size, alpha, beta, k);
        DeviceArray<float> d_dout(dout, count), d_inp(inp, count), d_out(out, count), d_scale(scale, count), d_dinp(count);
        lrn_backward(d_dinp.ptr, d_dout.ptr, d_inp.ptr, d_out.ptr, d_scale.ptr, N, C, H, W, size, alpha, beta, k, 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_maxpool_forward(float* out, const float* inp, int N, int C, int H, int W, int size,
                                       int stride, int OH, int OW) {
    return api_call([&] {
        require_pointers("maxpool_forward", {{"out", out}, {"inp", inp}});
        maxpool_check(N, C, H, W, size, stride, OH, OW);
        DeviceArray<float> d_inp(inp, (long)N * C * H * W), d_out((long)N * C * OH * OW);
        maxpool_forward(d_out.ptr, d_inp.ptr, N, C, H, W, size, stride, OH, OW, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_maxpool_backward(float* dinp, const float* dout, const float* inp, int N, int C, int H,
                                        int W, int size, int stride, int OH, int OW) {
    return api_call([&] {
        require_pointers("maxpool_backward", {{"dinp", dinp}, {"dout", dout}, {"inp", inp}});
        maxpool_check(N, C, H, W, size, stride, OH, OW);
        DeviceArray<float> d_dout(dout, (long)N * C * OH * OW), d_inp(inp, (long)N * C * H * W), d_dinp(d_inp.count);
        maxpool_backward(d_dinp.ptr, d_dout.ptr, d_inp.ptr, N, C, H, W, size, stride, OH, OW, 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_dropout_forward(float* out, const float* inp, long n, float p, uint64_t seed,
                                       uint32_t layer, uint64_t step, int train) {
    return api_call([&] {
        require_pointers("dropout_forward", {{"out", out}, {"inp", inp}});
        dropout_check("dropout_forward", n, p);
        DeviceArray<float> d_inp(inp, n), d_out(n);
        dropout_forward(d_out.ptr, d_inp.ptr, n, p, seed, layer, step, train != 0, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_dropout_backward(float* dinp, const float* dout, long n, float p, uint64_t seed,
                                        uint32_t layer, uint64_t step) {
    return api_call([&] {
        require_pointers("dropout_backward", {{"dinp", dinp}, {"dout", dout}});
        dropout_check("dropout_backward", n, p);
        DeviceArray<float> d_dout(dout, n), d_dinp(n);
        dropout_backward(d_dinp.ptr, d_dout.ptr, n, p, seed, layer, step, 0);
        d_dinp.download(dinp);
    });
}

// dlogits and correct are optional (NULL: not computed).
extern "C" int alexnet_softmax_cross_entropy(float* losses, float* dlogits, int* correct, const float* logits,
                                             const int* labels, int N, int K) {
    return api_call([&] {
        require_pointers("softmax_cross_entropy", {{"losses", losses}, {"logits", logits}, {"labels", labels}});
        softmax_check(N, K);
        for (int n = 0; n < N; n++)
            require(labels[n] >= 0 && labels[n] < K, "softmax_cross_entropy: label %d of row %d is not in [0, %d)", labels[n], n, K);
        DeviceArray<float> d_logits(logits, (long)N * K), d_losses(N), d_dlogits(dlogits ? (long)N * K : 0);
        DeviceArray<int> d_labels(labels, N), d_correct(correct ? 2 : 0);
        softmax_cross_entropy(d_losses.ptr, dlogits ? d_dlogits.ptr : nullptr, correct ? d_correct.ptr : nullptr,
                              d_logits.ptr, d_labels.ptr, N, K, 0);
        d_losses.download(losses);
        if (dlogits) d_dlogits.download(dlogits);
        if (correct) d_correct.download(correct);
    });
}

extern "C" int alexnet_softmax_forward(float* probs, const float* logits, int N, int K) {
    return api_call([&] {
        require_pointers("softmax_forward", {{"probs", probs}, {"logits", logits}});
        softmax_check(N, K);
        DeviceArray<float> d_logits(logits, (long)N * K), d_probs(d_logits.count);
        softmax_forward(d_probs.ptr, d_logits.ptr, N, K, 0);
        d_probs.download(probs);
    });
}

// w and v are updated in place.
extern "C" int alexnet_sgd_update(float* w, float* v, const float* g, long n, float lr, float momentum,
                                  float weight_decay) {
    return api_call([&] {
        require_pointers("sgd_update", {{"w", w}, {"v", v}, {"g", g}});
        elementwise_check("sgd_update", n);
        DeviceArray<float> d_w(w, n), d_v(v, n), d_g(g, n);
        sgd_update(d_w.ptr, d_v.ptr, d_g.ptr, n, lr, momentum, weight_decay, 0);
        d_w.download(w);
        d_v.download(v);
    });
}

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
