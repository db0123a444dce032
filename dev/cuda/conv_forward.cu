/*
Kernels for the forward convolution (groups = 1), from the naive loop to the core that
train_alexnet.cu runs:

    out[n][k][oy][ox] = relu(bias[k] + sum_{c,r,s} w[k][c][r][s] * in[n][c][oy*stride-pad+r][ox*stride-pad+s])

(inputs outside the image read as 0). As a matrix product C = A B: A = the weights,
[K][C*R*S]; B = the unrolled input ("im2col"), [C*R*S][N*OH*OW], column (n, oy, ox)
holding the input window of that output pixel; C = the output, row k, column (n, oy, ox).

Build and run (make dev-cuda builds both; the CPU build runs every kernel on the CPU):
    g++ -std=c++17 -O2 -pthread -x c++ dev/cuda/conv_forward.cu -o conv_forward
    nvcc -std=c++17 -O3 -arch=sm_90 dev/cuda/conv_forward.cu -o conv_forward
    ./conv_forward [VERSION] [--layer conv1..conv5|small] [--batch N] [--iters N]

version 1: naive direct convolution, one thread per output
./conv_forward 1

version 2: im2col into a scratch buffer, then a classic tiled shared-memory SGEMM
./conv_forward 2

version 3: implicit GEMM as the project first wrote it: the SGEMM of version 2 gathers
B's elements from the input itself, by division and modulo per element
./conv_forward 3

version 4: the core of train_alexnet.cu: conv_forward() with its own tile and split
choice, then the ConvForward problem on each tile shape with one split
./conv_forward 4

version 5: tensor cores, TF32: the ConvForward problem (the core's gathers) on
mma.m16n8k8 .tf32, operands rounded by cvt.rna, FP32 accumulation, 128x128 tiles
./conv_forward 5

version 6: tensor cores, BF16: the same on mma.m16n8k16 .bf16, operands rounded to
nearest even
./conv_forward 6

version 7: version 6 on input and weights stored in BF16 (the alternative to FP32
activations): one 2-byte load per value, then the weights as 4-byte pairs of values
./conv_forward 7

Every version is checked against a host reference (common.h says how; versions 5 to 7
against the reference of their rounded operands), then timed.
Exit status: 0 if every version passes, 1 on any FAIL, 2 on an error.
*/
#define ALEXNET_NO_MAIN
#include "../../train_alexnet.cu"
#include "common.h"

namespace ladder {

// ----------------------------------------------------------------------------
// GPU kernels

// The output of GEMM row k, column n = (image, oy, ox): bias, ReLU, NCHW store.
__device__ __forceinline__ void conv_store(float* out, const float* bias, const ConvShape& s,
                                           int k, int n, float v) {
    int image = n / (s.OH * s.OW), pixel = n % (s.OH * s.OW);
    out[((long)image * s.K + k) * s.OH * s.OW + pixel] = fmaxf(v + bias[k], 0.0f);
}

// Version 1: one thread per output, in output order (ox fastest): neighbouring threads
// read neighbouring input pixels and the same weights. Every input is read R*S*K times
// from global memory (caches do what they can).
__global__ void conv_forward_kernel1(float* out, const float* inp, const float* w,
                                     const float* bias, ConvShape s) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)s.N * s.K * s.OH * s.OW) return;
    int ox = i % s.OW, oy = i / s.OW % s.OH, k = i / s.OW / s.OH % s.K;
    int image = i / s.OW / s.OH / s.K;
    float sum = 0.0f;
    for (int c = 0; c < s.C; c++)
        for (int r = 0; r < s.R; r++)
            for (int t = 0; t < s.S; t++) {
                int y = oy * s.stride - s.pad + r, x = ox * s.stride - s.pad + t;
                if (y >= 0 && y < s.H && x >= 0 && x < s.W)
                    sum += w[((k * s.C + c) * s.R + r) * s.S + t]
                           * inp[(((long)image * s.C + c) * s.H + y) * s.W + x];
            }
    out[i] = fmaxf(sum + bias[k], 0.0f);
}

// Version 2a: im2col. cols[(c, r, s)][(image, oy, ox)] = the input under tap (r, s) of
// that output pixel, or 0 outside the image. One thread per element, in cols order.
// The buffer is C*R*S times the output's size: AlexNet's conv1 at batch 128 takes 560 MB.
__global__ void im2col_kernel(float* cols, const float* inp, ConvShape s) {
    const long ncols = (long)s.N * s.OH * s.OW;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)s.C * s.R * s.S * ncols) return;
    int n = i % ncols, crs = i / ncols;
    int image = n / (s.OH * s.OW), oy = n / s.OW % s.OH, ox = n % s.OW;
    int c = crs / (s.R * s.S), r = crs / s.S % s.R, t = crs % s.S;
    int y = oy * s.stride - s.pad + r, x = ox * s.stride - s.pad + t;
    bool inside = y >= 0 && y < s.H && x >= 0 && x < s.W;
    cols[i] = inside ? inp[(((long)image * s.C + c) * s.H + y) * s.W + x] : 0.0f;
}

// Versions 2 and 3 compute a 64x64 tile of C per block of 256 threads. Thread
// (ty, tx) = (tid / 16, tid % 16) holds the 4x4 outputs at rows ty + 16*i and columns
// tx + 16*j in registers, so that a warp reads consecutive shared-memory words.
// Per step kk of the slice: 4 + 4 shared loads feed 16 multiply-adds.
constexpr int TILE = 64, THREADS = 256;

template <int TILE_K>
__device__ __forceinline__ void multiply_slice(float (&acc)[4][4], const float (*a_tile)[TILE + 1],
                                               const float (*b_tile)[TILE + 1], int ty, int tx) {
    for (int kk = 0; kk < TILE_K; kk++) {
        float a[4], b[4];
        UNROLL for (int i = 0; i < 4; i++) {
            a[i] = a_tile[kk][ty + 16 * i];
            b[i] = b_tile[kk][tx + 16 * i];
        }
        UNROLL for (int i = 0; i < 4; i++)
            UNROLL for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
    }
}

__device__ __forceinline__ void store_tile(const float (&acc)[4][4], float* out, const float* bias,
                                           const ConvShape& s, int ty, int tx) {
    const int ncols = s.N * s.OH * s.OW;
    UNROLL for (int i = 0; i < 4; i++)
        UNROLL for (int j = 0; j < 4; j++) {
            int k = blockIdx.y * TILE + ty + 16 * i, n = blockIdx.x * TILE + tx + 16 * j;
            if (k < s.K && n < ncols) conv_store(out, bias, s, k, n, acc[i][j]);
        }
}

// Version 2b: C = A * cols, the classic tiled SGEMM. Per slice of TILE_K = 16, the block
// stages A's 64x16 and B's 16x64 in shared memory (4 loads per thread each, zeros past
// the edges), waits, multiplies, waits. Loads are coalesced: neighbouring threads take
// neighbouring k of a weight row (A is stored transposed, a_tile[k][m]; the +1 padding
// cuts those stores' bank conflicts from 16-way to 2-way) and neighbouring columns of a
// cols row.
__global__ void __launch_bounds__(THREADS) sgemm_kernel2(float* out, const float* w,
                                                        const float* cols, const float* bias,
                                                        ConvShape s) {
    constexpr int TILE_K = 16;
    SHARED(float, a_tile, [TILE_K][TILE + 1]);
    SHARED(float, b_tile, [TILE_K][TILE + 1]);
    const int depth = s.C * s.R * s.S, ncols = s.N * s.OH * s.OW;
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    const int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < depth; k0 += TILE_K) {
        UNROLL for (int i = 0; i < 4; i++) {
            int m = m0 + tid / 16 + 16 * i, ka = k0 + tid % 16;
            a_tile[tid % 16][tid / 16 + 16 * i] = m < s.K && ka < depth ? w[(long)m * depth + ka] : 0.0f;
            int n = n0 + tid % 64, kb = k0 + tid / 64 + 4 * i;
            b_tile[tid / 64 + 4 * i][tid % 64] = n < ncols && kb < depth ? cols[(long)kb * ncols + n] : 0.0f;
        }
        __syncthreads();
        multiply_slice<TILE_K>(acc, a_tile, b_tile, ty, tx);
        __syncthreads();
    }
    store_tile(acc, out, bias, s, ty, tx);
}

// Version 3: no buffer. B's element (crs, n) is gathered where it lives in the input,
// (image, oy, ox) and (c, r, s) found by division and modulo for every element, as the
// project's first core did. From that core too: slices
// of TILE_K = 32, and a register prefetch: the next slice's 8 + 8 loads per thread are
// issued before the current slice is multiplied, so their latency hides behind the math.
__device__ __forceinline__ float unrolled_input(const float* inp, const ConvShape& s, int crs, int n) {
    int image = n / (s.OH * s.OW), pixel = n % (s.OH * s.OW);
    int c = crs / (s.R * s.S), rs = crs % (s.R * s.S);
    int y = pixel / s.OW * s.stride - s.pad + rs / s.S;
    int x = pixel % s.OW * s.stride - s.pad + rs % s.S;
    if (y < 0 || y >= s.H || x < 0 || x >= s.W) return 0.0f;
    return inp[(((long)image * s.C + c) * s.H + y) * s.W + x];
}

__global__ void __launch_bounds__(THREADS) implicit_gemm_kernel3(float* out, const float* inp,
                                                                const float* w, const float* bias,
                                                                ConvShape s) {
    constexpr int TILE_K = 32;
    SHARED(float, a_tile, [TILE_K][TILE + 1]);
    SHARED(float, b_tile, [TILE_K][TILE + 1]);
    const int depth = s.C * s.R * s.S, ncols = s.N * s.OH * s.OW;
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    const int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
    float a_next[8], b_next[8];
    auto fetch = [&](int k0) {  // slice [k0, k0 + 32) into registers, zeros past the edges
        UNROLL for (int i = 0; i < 8; i++) {
            int m = m0 + tid / 32 + 8 * i, ka = k0 + tid % 32;
            a_next[i] = m < s.K && ka < depth ? w[(long)m * depth + ka] : 0.0f;
            int n = n0 + tid % 64, kb = k0 + tid / 64 + 4 * i;
            b_next[i] = n < ncols && kb < depth ? unrolled_input(inp, s, kb, n) : 0.0f;
        }
    };
    float acc[4][4] = {};
    fetch(0);
    for (int k0 = 0; k0 < depth; k0 += TILE_K) {
        UNROLL for (int i = 0; i < 8; i++) {
            a_tile[tid % 32][tid / 32 + 8 * i] = a_next[i];
            b_tile[tid / 64 + 4 * i][tid % 64] = b_next[i];
        }
        __syncthreads();
        if (k0 + TILE_K < depth) fetch(k0 + TILE_K);
        multiply_slice<TILE_K>(acc, a_tile, b_tile, ty, tx);
        __syncthreads();
    }
    store_tile(acc, out, bias, s, ty, tx);
}

// Version 4 is train_alexnet.cu's gemm_kernel on the ConvForward problem (section 3):
// 128x128, 64x128 or 128x64 tiles, 8x8 outputs per thread read as 128-bit shared loads,
// gathers without division (a per-slice table of (offset, y, x) steps, advanced by
// carries), slices of 16 double-buffered in shared memory with one barrier each, and
// split-K when the tiles alone would leave SMs idle.

// Versions 5 and 6 are common.h's mma_gemm_kernel on the ConvForward problem: the
// gathers of version 4 (origins, step tables), each value rounded to TF32 or BF16 as it
// is stored to shared memory, 64x32 outputs per warp computed by mma.sync from
// fragments that ldmatrix reads. The 8x8 FFMA of a thread become 16 mma per warp per step.
// Version 7 reads input and weights stored in BF16 (common.h's StoredBf16): half the
// bytes; the weight rows are contiguous along k and may be read a pair at a time, while
// the input's neighbours along k cross window rows and the image border.

// ----------------------------------------------------------------------------
// Kernel launchers

void conv_forward1(float* out, const float* inp, const float* w, const float* bias,
                   const ConvShape& s, cudaStream_t stream) {
    long outputs = (long)s.N * s.K * s.OH * s.OW;
    LAUNCH(conv_forward_kernel1, ceil_div(outputs, 256), 256, 0, stream, out, inp, w, bias, s);
}

void conv_forward2(float* out, const float* inp, const float* w, const float* bias,
                   const ConvShape& s, float* cols, cudaStream_t stream) {
    long ncols = (long)s.N * s.OH * s.OW, elements = (long)s.C * s.R * s.S * ncols;
    LAUNCH(im2col_kernel, ceil_div(elements, 256), 256, 0, stream, cols, inp, s);
    dim3 grid(ceil_div(ncols, TILE), ceil_div(s.K, TILE));
    LAUNCH(sgemm_kernel2, grid, THREADS, 0, stream, out, w, cols, bias, s);
}

void conv_forward3(float* out, const float* inp, const float* w, const float* bias,
                   const ConvShape& s, cudaStream_t stream) {
    dim3 grid(ceil_div((long)s.N * s.OH * s.OW, TILE), ceil_div(s.K, TILE));
    LAUNCH(implicit_gemm_kernel3, grid, THREADS, 0, stream, out, inp, w, bias, s);
}

// Version 4 with a fixed tile and one split, set up as gemm_launch does.
template <int TILE_M, int TILE_N>
void conv_forward4_tiles(float* out, const float* inp, const float* w, const float* bias,
                         const ConvShape& s, cudaStream_t stream) {
    ConvForward p(s, out, inp, w, bias, true);
    gemm_carries(p.a);
    gemm_carries(p.b);
    p.dims.splits = 1;
    p.dims.depth_per_split = ceil_div(p.dims.depth, GEMM_TILE_K) * GEMM_TILE_K;
    gemm_launch_tiles<TILE_M, TILE_N>(p, nullptr, stream);
}

// train_alexnet.cu's conv_forward as it stands: tile and split chosen by gemm_launch.
void conv_forward_auto(float* out, const float* inp, const float* w, const float* bias, const ConvShape& s,
                       Workspace ws, Precision precision, cudaStream_t stream) {
    conv_forward(out, inp, w, bias, s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.stride, s.pad, 1, s.OH, s.OW, true, ws,
                 precision, stream);
}

template <typename Operands>
void conv_forward_mma(float* out, const float* inp, const float* w, const float* bias,
                      const ConvShape& s, cudaStream_t stream) {
    mma_gemm_launch<Operands>(ConvForward(s, out, inp, w, bias, true), stream);
}

template <bool PAIRS>
void conv_forward_stored(float* out, const uint16_t* inp, const uint16_t* w, const float* bias,
                         const ConvShape& s, cudaStream_t stream) {
    const ConvForward p(s, out, nullptr, nullptr, bias, true);
    mma_gemm_launch<MmaBf16>(StoredBf16<ConvForward, PAIRS>(p, w, inp), stream);
}

// ----------------------------------------------------------------------------
// Layers, the host reference, main

struct Layer {
    const char* name;
    int C, H, W, K, R, S, stride, pad, OH, OW;
};

// One tower of AlexNet (as in dev/bench_kernels.cu; conv3 reads both towers), and a
// small odd-sized shape for the tests: K, depth and columns all end in partial tiles.
static const Layer LAYERS[] = {
    {"conv1", 3, 224, 224, 48, 11, 11, 4, 0, 55, 55},
    {"conv2", 48, 27, 27, 128, 5, 5, 1, 2, 27, 27},
    {"conv3", 256, 13, 13, 192, 3, 3, 1, 1, 13, 13},
    {"conv4", 192, 13, 13, 192, 3, 3, 1, 1, 13, 13},
    {"conv5", 192, 13, 13, 128, 3, 3, 1, 1, 13, 13},
    {"small", 7, 19, 23, 70, 5, 3, 2, 1, 9, 12},
};

static const char* USAGE =
    "usage: conv_forward [VERSION] [--layer NAME] [--batch N] [--iters N]\n"
    "  VERSION    1 naive, 2 im2col + SGEMM, 3 first implicit GEMM, 4 train_alexnet.cu's core,\n"
    "             5 tensor cores TF32, 6 tensor cores BF16, 7 BF16 on BF16-stored operands\n"
    "             (5-7: sm_80 and later); default: all\n"
    "  --layer    conv1..conv5 (one AlexNet tower) or small (a test shape); default conv2\n"
    "  --batch N  images (default: 128 on a GPU, 2 on the CPU build)\n"
    "  --iters N  timed launches per version (default: 20 on a GPU, 1 on the CPU build; 0: check only)\n";

static int run(int argc, char** argv) {
    Args a;
    a.layer = "conv2";
    if (!parse_args(argc, argv, 7, USAGE, a)) return 0;
    const Layer* l = &find_layer(LAYERS, a.layer);
    const ConvShape s{a.batch, l->C, l->H, l->W, l->K, l->R, l->S, l->stride, l->pad, 1, l->OH, l->OW};
    conv_check_shape(s);
    const int depth = s.C * s.R * s.S;
    const long in_size = (long)s.N * s.C * s.H * s.W, outputs = (long)s.N * s.K * s.OH * s.OW;

    const float scale = 1.0f / sqrtf((float)depth);
    std::vector<float> inp = uniform(in_size, 1, -1.0f, 1.0f);
    std::vector<float> w = uniform((long)s.K * depth, 2, -scale, scale);
    std::vector<float> bias = uniform(s.K, 3, -0.5f, 0.5f);
    References refs([&](Format f) {
        const std::vector<float> wf = round_to(f, w), xf = round_to(f, inp);
        return Reference(outputs, depth, (long)s.K * s.OH * s.OW, [&](long i, double& sum, double& abs_sum) {
            int ox = i % s.OW, oy = i / s.OW % s.OH, k = i / s.OW / s.OH % s.K;
            long image = i / s.OW / s.OH / s.K;
            sum = bias[k], abs_sum = fabs(bias[k]);
            for (int c = 0; c < s.C; c++)
                for (int r = 0; r < s.R; r++)
                    for (int t = 0; t < s.S; t++) {
                        int y = oy * s.stride - s.pad + r, x = ox * s.stride - s.pad + t;
                        if (y < 0 || y >= s.H || x < 0 || x >= s.W) continue;
                        double term = (double)wf[((k * s.C + c) * s.R + r) * s.S + t]
                                      * xf[((image * s.C + c) * s.H + y) * s.W + x];
                        sum += term, abs_sum += fabs(term);
                    }
        });
    });

    DeviceArray<float> d_inp(inp.data(), inp.size()), d_w(w.data(), w.size()),
        d_bias(bias.data(), bias.size()), out(outputs),
        cols(a.version == 0 || a.version == 2 ? (long)depth * s.N * s.OH * s.OW : 1);
    DeviceArray<float> workspace(std::max<size_t>(1, conv_workspace(
        s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.stride, s.pad, 1, s.OH, s.OW)));
    const Workspace ws{workspace.ptr, workspace.count};
    const std::vector<uint16_t> inp16 = bf16_bits(inp), w16 = bf16_bits(w);
    DeviceArray<uint16_t> d_inp16(inp16.data(), inp16.size()), d_w16(w16.data(), w16.size());
    cudaStream_t stream;
    cudaCheck(cudaStreamCreate(&stream));
    char automatic[NUM_PRECISIONS][64];  // what gemm_launch chooses in each precision
    for (int p = 0; p < NUM_PRECISIONS; p++)
        describe_plan(automatic[p], "conv_forward", (Precision)p, gemm_plan(ConvForward(s, out.ptr, d_inp.ptr, d_w.ptr, d_bias.ptr, true),
                                                             (long)ws.floats, (Precision)p));

    float *o = out.ptr, *x = d_inp.ptr, *wp = d_w.ptr, *b = d_bias.ptr;
    const uint16_t *x16 = d_inp16.ptr, *w16p = d_w16.ptr;
    std::vector<Version> versions = {
        {1, "naive direct", [&] { conv_forward1(o, x, wp, b, s, stream); }},
        {2, "im2col + SGEMM 64x64", [&] { conv_forward2(o, x, wp, b, s, cols.ptr, stream); }},
        {3, "implicit GEMM 64x64, div/mod gathers", [&] { conv_forward3(o, x, wp, b, s, stream); }},
        {4, automatic[FP32], [&] { conv_forward_auto(o, x, wp, b, s, ws, FP32, stream); }},
        {4, "core 128x128, 1 split", [&] { conv_forward4_tiles<128, 128>(o, x, wp, b, s, stream); }},
        {4, "core 64x128, 1 split", [&] { conv_forward4_tiles<64, 128>(o, x, wp, b, s, stream); }},
        {4, "core 128x64, 1 split", [&] { conv_forward4_tiles<128, 64>(o, x, wp, b, s, stream); }},
    };
    if (has_tensor_cores()) {
        versions.push_back({5, automatic[TF32], [&] { conv_forward_auto(o, x, wp, b, s, ws, TF32, stream); }, TF32});
        versions.push_back({5, "mma tf32 128x128, warp 64x32, 1 split", [&] { conv_forward_mma<MmaTf32>(o, x, wp, b, s, stream); }, TF32});
        versions.push_back({6, automatic[BF16], [&] { conv_forward_auto(o, x, wp, b, s, ws, BF16, stream); }, BF16});
        versions.push_back({6, "mma bf16 128x128, warp 64x32, 1 split", [&] { conv_forward_mma<MmaBf16>(o, x, wp, b, s, stream); }, BF16});
        versions.push_back({7, "mma bf16 128x128, bf16-stored, 2-byte loads", [&] { conv_forward_stored<false>(o, x16, w16p, b, s, stream); }, BF16});
        if (depth % 2 == 0)
            versions.push_back({7, "mma bf16 128x128, bf16-stored, weight pairs", [&] { conv_forward_stored<true>(o, x16, w16p, b, s, stream); }, BF16});
    }
    char what[160];
    snprintf(what, sizeof(what), "conv_forward %s: %dx%dx%d -> %dx%dx%d, %dx%d filter, stride %d, pad %d, "
             "batch %d, depth %d", l->name, s.C, s.H, s.W, s.K, s.OH, s.OW, s.R, s.S, s.stride,
             s.pad, s.N, depth);
    print_setup(what, refs(FP32), outputs);
    const double flop = 2.0 * outputs * depth;
    int status = run_versions(a, versions, refs, out, flop, stream);
    cudaCheck(cudaStreamDestroy(stream));
    return status;
}

}  // namespace ladder

int main(int argc, char** argv) {
    try {
        return ladder::run(argc, argv);
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 2;
    }
}
