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
// shared-memory words. The reduction advances in steps of GEMM_TILE_K: the block stages
// a TILE_M x GEMM_TILE_K slice of A and a GEMM_TILE_K x TILE_N slice of B in shared
// memory; the next slices are fetched into registers while the current ones are
// multiplied, hiding global-memory latency.
// blockIdx.z enumerates (split, batch): batches are independent GEMMs (conv groups,
// stride phases), and a long reduction may be split into ranges whose partial
// products a second kernel adds up in a fixed order (deterministic, no atomics).

constexpr int GEMM_THREADS = 256;
constexpr int GEMM_TILE_AREA = 64 * 64;  // TILE_M * TILE_N
constexpr int GEMM_TILE_K = 16;
constexpr int GEMM_MICRO = 4;            // 4x4 outputs per thread: 256 * 16 = the tile area

// Sizes of one GEMM (of each batch) and how its reduction is split.
struct GemmDims {
    int rows, cols, depth;  // C is rows x cols, summed over depth
    int batches;            // independent GEMMs of these sizes
    int splits;             // the reduction is cut into ranges of depth_per_split
    int depth_per_split;    // a multiple of GEMM_TILE_K
};

static GemmDims gemm_dims(int rows, int cols, int depth, int batches, int splits) {
    int tiles = ceil_div(depth, GEMM_TILE_K);
    int tiles_per_split = ceil_div(tiles, splits);
    // recount, so that no split is left with an empty range
    return GemmDims{rows, cols, depth, batches, ceil_div(tiles, tiles_per_split),
                    tiles_per_split * GEMM_TILE_K};
}

// Which operand index is consecutive in memory decides how a block's threads walk a
// TILE x GEMM_TILE_K slice: along k (thread t takes k = t % TILE_K) or along m/n
// (t takes m = t % TILE), so that neighbouring threads read neighbouring addresses.
// Load i of thread t (i < TILE * GEMM_TILE_K / GEMM_THREADS) is element (mn, k).
template <int TILE, bool K_CONTIGUOUS>
struct TileWalk {
    static constexpr int loads = TILE * GEMM_TILE_K / GEMM_THREADS;
    static __device__ __forceinline__ int mn(int tid, int i) {
        return K_CONTIGUOUS ? tid / GEMM_TILE_K + i * (GEMM_THREADS / GEMM_TILE_K) : tid % TILE;
    }
    static __device__ __forceinline__ int k(int tid, int i) {
        return K_CONTIGUOUS ? tid % GEMM_TILE_K : tid / TILE + i * (GEMM_THREADS / TILE);
    }
};

// A Problem provides: GemmDims dims; the flags a_k_contiguous, b_k_contiguous and
// row_sums; a(batch, m, k) and b(batch, k, n) for in-range indices; store(batch, split,
// m, n, value); and, when row_sums is set, store_row_sum(batch, split, m, value), which
// receives sum_k A[m][k] over the split's range (the bias gradient: when A is the output
// gradient, the bias is a weight whose input is always 1).
template <int TILE_M, typename Problem>
__global__ void __launch_bounds__(GEMM_THREADS, 2) gemm_tile_kernel(Problem p) {
    constexpr int TILE_N = GEMM_TILE_AREA / TILE_M;
    constexpr int STEP_M = TILE_M / GEMM_MICRO, STEP_N = TILE_N / GEMM_MICRO;
    using WalkA = TileWalk<TILE_M, Problem::a_k_contiguous>;
    using WalkB = TileWalk<TILE_N, Problem::b_k_contiguous>;
    // row stride TILE + 2: the k-contiguous walk stores 16 k-rows x 2 columns per warp,
    // which land in 32 distinct banks (2k + m mod 32)
    SHARED(float, a_tile, [GEMM_TILE_K][TILE_M + 2]);
    SHARED(float, b_tile, [GEMM_TILE_K][TILE_N + 2]);
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
    for (int k0 = k_begin; k0 < k_end; k0 += GEMM_TILE_K) {
        for (int i = 0; i < WalkA::loads; i++)
            a_tile[WalkA::k(tid, i)][WalkA::mn(tid, i)] = a_next[i];
        for (int i = 0; i < WalkB::loads; i++)
            b_tile[WalkB::k(tid, i)][WalkB::mn(tid, i)] = b_next[i];
        __syncthreads();
        if (k0 + GEMM_TILE_K < k_end) fetch(k0 + GEMM_TILE_K);
        for (int kk = 0; kk < GEMM_TILE_K; kk++) {
            float a_frag[GEMM_MICRO], b_frag[GEMM_MICRO];
            for (int i = 0; i < GEMM_MICRO; i++) {
                a_frag[i] = a_tile[kk][ty + i * STEP_M];
                b_frag[i] = b_tile[kk][tx + i * STEP_N];
            }
            for (int i = 0; i < GEMM_MICRO; i++)
                for (int j = 0; j < GEMM_MICRO; j++) acc[i][j] += a_frag[i] * b_frag[j];
            if (sums_rows)
                for (int i = 0; i < GEMM_MICRO; i++) row_sum[i] += a_frag[i];
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
    dim3 grid(ceil_div(d.cols, GEMM_TILE_AREA / TILE_M), ceil_div(d.rows, TILE_M),
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

// ----------------------------------------------------------------------------
// 5. Local response normalisation (across channels)

// ----------------------------------------------------------------------------
// 6. Max pooling

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
