/*
Kernels for the fully connected forward pass, from the naive loop to the core that
train_alexnet.cu runs:

    out[n][o] = relu(bias[o] + sum_i in[n][i] * w[o][i])

As a matrix product C = A B: A = the input [N][in], B = the weights transposed
[in][out], C = the output [N][out]. At AlexNet's batch of 128 the product is short
and wide with a long reduction (fc6: 128 x 2048, summed over 9216), so the tiles alone
fill few SMs: the reduction is split (split-K) and the partial products added up after.

Build and run (make dev-cuda builds both; the CPU build runs every kernel on the CPU):
    g++ -std=c++17 -O2 -pthread -x c++ dev/cuda/fc_forward.cu -o fc_forward
    nvcc -std=c++17 -O3 -arch=sm_90 dev/cuda/fc_forward.cu -o fc_forward
    ./fc_forward [VERSION] [--layer fc6|fc7|fc8|small] [--batch N] [--iters N]

version 1: naive, one thread per output
./fc_forward 1

version 2: train_alexnet.cu's GEMM core on the FcForward problem, 128x128 tiles, no split
./fc_forward 2

version 3: the core as the model calls it: fc_forward(), tile and split-K chosen from
the device (the CPU build answers as a 132-SM H100)
./fc_forward 3

versions 4 and 5: tensor cores, TF32 and BF16: the FcForward problem on common.h's
mma_gemm_kernel (as conv_forward.cu's versions 5 and 6), 128x128 tiles, no split
./fc_forward 4

version 6: version 5 on inputs and weights stored in BF16 (the alternative to FP32
activations): one 2-byte load per value, then one 4-byte load per pair of values
./fc_forward 6

Every version is checked against a host reference (common.h says how; versions 4 to 6
against the reference of their rounded operands), then timed.
Exit status: 0 if every version passes, 1 on any FAIL, 2 on an error.
*/
#define ALEXNET_NO_MAIN
#include "../../train_alexnet.cu"
#include "common.h"

namespace ladder {

// ----------------------------------------------------------------------------
// GPU kernels

// Version 1: thread (n, o) = (blockIdx.y, blockIdx.x * 256 + threadIdx.x) sums its dot
// product alone. A block's threads share the input row (one broadcast load per i) but
// read 256 different weight rows, `in` floats apart: no two loads of a warp share a
// 32-byte sector, and every weight is read again for every image.
__global__ void fc_forward_kernel1(float* out, const float* inp, const float* w,
                                   const float* bias, int in, int out_features) {
    int n = blockIdx.y, o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= out_features) return;
    float sum = 0.0f;
    for (int i = 0; i < in; i++) sum += inp[(long)n * in + i] * w[(long)o * in + i];
    out[(long)n * out_features + o] = fmaxf(sum + bias[o], 0.0f);
}

// Versions 2 and 3 are train_alexnet.cu's gemm_kernel on the FcForward problem
// (sections 3 and 7): both operands are read along the reduction (rows of inp and of
// w are contiguous), 8x8 outputs per thread, slices of 16 double-buffered in shared
// memory. Version 3 adds split-K: blockIdx.z picks a range of the reduction, each
// split writes its partial tile to the workspace, and gemm_split_sum_kernel adds the
// splits in a fixed order (the same bits every run) before the bias and ReLU.

// Versions 4 and 5 run FcForward on common.h's mma_gemm_kernel: inputs and weights, both
// read along the reduction, rounded to TF32 or BF16 into k-contiguous shared tiles, and
// multiplied by mma.sync in FP32. Without split-K: at batch 128, fc6 is 16 tiles again.
// Version 6 stores both in BF16 (common.h's StoredBf16): half the bytes, and with pair
// loads half the load instructions, as the input and weight rows are contiguous along k.

// ----------------------------------------------------------------------------
// Kernel launchers

void fc_forward1(float* out, const float* inp, const float* w, const float* bias, int N, int in,
                 int out_features, cudaStream_t stream) {
    dim3 grid(ceil_div(out_features, 256), N);
    LAUNCH(fc_forward_kernel1, grid, 256, 0, stream, out, inp, w, bias, in, out_features);
}

// The core with 128x128 tiles and one split, set up as gemm_launch does.
void fc_forward2(float* out, const float* inp, const float* w, const float* bias, int N, int in,
                 int out_features, cudaStream_t stream) {
    FcForward p(N, in, out_features, out, inp, w, bias, true);
    gemm_carries(p.a);
    gemm_carries(p.b);
    p.dims.splits = 1;
    p.dims.depth_per_split = ceil_div(in, GEMM_TILE_K) * GEMM_TILE_K;
    gemm_launch_tiles<128, 128>(p, nullptr, stream);
}

template <typename Operands>
void fc_forward_mma(float* out, const float* inp, const float* w, const float* bias, int N, int in,
                    int out_features, cudaStream_t stream) {
    mma_gemm_launch<Operands>(FcForward(N, in, out_features, out, inp, w, bias, true), stream);
}

template <bool PAIRS>
void fc_forward_stored(float* out, const uint16_t* inp, const uint16_t* w, const float* bias, int N, int in,
                       int out_features, cudaStream_t stream) {
    const FcForward p(N, in, out_features, out, nullptr, nullptr, bias, true);
    mma_gemm_launch<MmaBf16>(StoredBf16<FcForward, PAIRS>(p, inp, w), stream);
}

// ----------------------------------------------------------------------------
// Layers, the host reference, main

struct Layer {
    const char* name;
    int in, out;
};

// One tower of AlexNet (each layer reads both towers), and a small shape for the tests
// whose reduction still splits.
static const Layer LAYERS[] = {
    {"fc6", 9216, 2048}, {"fc7", 4096, 2048}, {"fc8", 4096, 500}, {"small", 1000, 300}};

static const char* USAGE =
    "usage: fc_forward [VERSION] [--layer NAME] [--batch N] [--iters N]\n"
    "  VERSION    1 naive, 2 train_alexnet.cu's core without split-K, 3 fc_forward (split-K),\n"
    "             4 tensor cores TF32, 5 tensor cores BF16, 6 BF16 on BF16-stored operands\n"
    "             (4-6: sm_80 and later); default: all\n"
    "  --layer    fc6, fc7, fc8 (one AlexNet tower) or small (a test shape); default fc6\n"
    "  --batch N  images (default: 128 on a GPU, 2 on the CPU build)\n"
    "  --iters N  timed launches per version (default: 20 on a GPU, 1 on the CPU build; 0: check only)\n";

static int run(int argc, char** argv) {
    Args a;
    a.layer = "fc6";
    if (!parse_args(argc, argv, 6, USAGE, a)) return 0;
    const Layer* l = &find_layer(LAYERS, a.layer);
    const int N = a.batch, in = l->in, outf = l->out;
    fc_check_shape(N, in, outf);
    const long outputs = (long)N * outf;

    const float scale = 1.0f / sqrtf((float)in);
    std::vector<float> inp = uniform((long)N * in, 1, -1.0f, 1.0f);
    std::vector<float> w = uniform((long)outf * in, 2, -scale, scale);
    std::vector<float> bias = uniform(outf, 3, -0.5f, 0.5f);
    References refs([&](Format f) {
        const std::vector<float> xf = round_to(f, inp), wf = round_to(f, w);
        return Reference(outputs, in, outf, [&](long j, double& sum, double& abs_sum) {
            long n = j / outf, o = j % outf;
            sum = bias[o], abs_sum = fabs(bias[o]);
            for (long i = 0; i < in; i++) {
                double term = (double)xf[n * in + i] * wf[o * in + i];
                sum += term, abs_sum += fabs(term);
            }
        });
    });

    DeviceArray<float> d_inp(inp.data(), inp.size()), d_w(w.data(), w.size()),
        d_bias(bias.data(), bias.size()), out(outputs);
    const std::vector<uint16_t> inp16 = bf16_bits(inp), w16 = bf16_bits(w);
    DeviceArray<uint16_t> d_inp16(inp16.data(), inp16.size()), d_w16(w16.data(), w16.size());
    DeviceArray<float> workspace(std::max<size_t>(1, fc_workspace(N, in, outf)));
    const Workspace ws{workspace.ptr, workspace.count};
    cudaStream_t stream;
    cudaCheck(cudaStreamCreate(&stream));
    char automatic[NUM_PRECISIONS][64];  // what gemm_launch chooses in each precision
    for (int p = 0; p < NUM_PRECISIONS; p++)
        describe_plan(automatic[p], "fc_forward", (Precision)p, gemm_plan(FcForward(N, in, outf, out.ptr, d_inp.ptr, d_w.ptr, d_bias.ptr,
                                                                     true), (long)ws.floats, (Precision)p));

    float *o = out.ptr, *x = d_inp.ptr, *wp = d_w.ptr, *b = d_bias.ptr;
    const uint16_t *x16 = d_inp16.ptr, *w16p = d_w16.ptr;
    std::vector<Version> versions = {
        {1, "naive", [&] { fc_forward1(o, x, wp, b, N, in, outf, stream); }},
        {2, "core 128x128, 1 split", [&] { fc_forward2(o, x, wp, b, N, in, outf, stream); }},
        {3, automatic[FP32], [&] { fc_forward(o, x, wp, b, N, in, outf, true, ws, FP32, stream); }},
    };
    if (has_tensor_cores()) {
        versions.push_back({4, automatic[TF32], [&] { fc_forward(o, x, wp, b, N, in, outf, true, ws, TF32, stream); }, TF32});
        versions.push_back({4, "mma tf32 128x128, warp 64x32, 1 split", [&] { fc_forward_mma<MmaTf32>(o, x, wp, b, N, in, outf, stream); }, TF32});
        versions.push_back({5, automatic[BF16], [&] { fc_forward(o, x, wp, b, N, in, outf, true, ws, BF16, stream); }, BF16});
        versions.push_back({5, "mma bf16 128x128, warp 64x32, 1 split", [&] { fc_forward_mma<MmaBf16>(o, x, wp, b, N, in, outf, stream); }, BF16});
        versions.push_back({6, "mma bf16 128x128, bf16-stored, 2-byte loads", [&] { fc_forward_stored<false>(o, x16, w16p, b, N, in, outf, stream); }, BF16});
        if (in % 2 == 0)
            versions.push_back({6, "mma bf16 128x128, bf16-stored, 4-byte pairs", [&] { fc_forward_stored<true>(o, x16, w16p, b, N, in, outf, stream); }, BF16});
    }
    char what[96];
    snprintf(what, sizeof(what), "fc_forward %s: %d -> %d, batch %d", l->name, in, outf, N);
    print_setup(what, refs(FP32), outputs);
    int status = run_versions(a, versions, refs, out, 2.0 * outputs * in, stream);
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
