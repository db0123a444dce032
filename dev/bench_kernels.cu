/*
Per-kernel benchmark: every launcher of train_alexnet.cu at the real AlexNet shapes
of ONE tower of the paper's network, timed with CUDA events after warm-up.

    make bench-kernels                    # builds build/cpu/bench_kernels (+ build/gpu/bench_kernels with nvcc)
    build/gpu/bench_kernels               # batch 128 on a GPU
    build/cpu/bench_kernels --batch 8     # the CPU build (default batch 8: the CPU runtime is slow)
    build/cpu/bench_kernels --only conv2  # only the lines whose name contains "conv2"
    build/gpu/bench_kernels --precision bf16  # conv and fc on tensor cores (also tf32)

Prints ms per call and GFLOP/s for convolution and fully connected layers (forward,
backward-data, backward-weights; 2 FLOP per multiply-add, bias and ReLU not counted)
and GB/s for the memory-bound layers (each input element read once and each output
element written once: the least traffic the op can have). Inputs are uniform random
in [-1, 1) from a fixed seed; the numbers are speeds, not results.

The benchmark is the .cu itself with its main() left out, so it times exactly the
launchers the model calls.
*/
#define ALEXNET_NO_MAIN
#include "../train_alexnet.cu"

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <vector>

// Everything here lives in its own namespace: the .cu above has its own Options, shapes, ...
namespace kernel_bench {

struct Options {
    int batch = 0;            // 0: 128 on a GPU, 8 on the CPU build
    int iters = 0;            // timed calls per op; 0: 10 on a GPU, 1 on the CPU build
    int warmup = -1;          // untimed calls first; -1: 1 on a GPU, 0 on the CPU build
    const char* only = "";    // substring filter on the op names
    Precision precision = FP32;  // of the conv and fc products
};

// A device buffer filled from a fixed-seed generator (uniform in [lo, hi)).
struct RandomBuffer : DeviceArray<float> {
    RandomBuffer(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) : DeviceArray<float>(n) {
        std::vector<float> host(n);
        uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
        for (float& x : host) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            x = lo + (hi - lo) * (float)(state >> 40) * (1.0f / 16777216.0f);
        }
        cudaCheck(cudaMemcpy(ptr, host.data(), bytes(), cudaMemcpyHostToDevice));
    }
};

// Device copy of a host vector (labels, offsets, flips, ...).
template <typename T>
struct HostCopy : DeviceArray<T> {
    explicit HostCopy(const std::vector<T>& host) : DeviceArray<T>(host.data(), host.size()) {}
};

struct Bench {
    Options opt;
    cudaStream_t stream = nullptr;
    double step_ms = 0.0;  // estimated time of one training step, both towers, kernels back to back

    // Does --only select any of these ops of `layer` ("" for none)? Saves the allocations
    // of groups that would print nothing.
    bool selects(const char* layer, std::initializer_list<const char*> ops) const {
        char name[96];
        for (const char* op : ops) {
            snprintf(name, sizeof(name), "%s%s%s", layer, *layer ? " " : "", op);
            if (strstr(name, opt.only)) return true;
        }
        return false;
    }

    // Time `launch` (ms per call) and print one line. `work` is FLOP (flops=true) or bytes.
    // `per_step` is how often the op runs in one training step of ONE tower.
    void run(const char* name, const char* shape, double work, bool flops, double per_step,
             const std::function<void()>& launch) {
        if (!strstr(name, opt.only)) return;
        for (int i = 0; i < opt.warmup; i++) launch();
        float total = elapsed_ms(stream, [&] {
            for (int i = 0; i < opt.iters; i++) launch();
        });
        double ms = total / opt.iters;
        printf("%-28s %-32s %10.3f ms %10.1f %s\n", name, shape, ms, work / ms / 1e6,
               flops ? "GFLOP/s" : "GB/s");
        fflush(stdout);
        step_ms += 2.0 * per_step * ms;  // two towers
    }
};

struct ConvLayer {
    const char* name;
    int C, H, W, K, R, S, stride, pad, OH, OW;
    bool backward_data;  // conv1's input gradient is never needed in training
};

// The five convolutions of one tower (conv3 reads both towers: C = 2 x 128).
static const ConvLayer CONVS[] = {
    {"conv1", 3, 224, 224, 48, 11, 11, 4, 0, 55, 55, false},
    {"conv2", 48, 27, 27, 128, 5, 5, 1, 2, 27, 27, true},
    {"conv3", 256, 13, 13, 192, 3, 3, 1, 1, 13, 13, true},
    {"conv4", 192, 13, 13, 192, 3, 3, 1, 1, 13, 13, true},
    {"conv5", 192, 13, 13, 128, 3, 3, 1, 1, 13, 13, true},
};

struct FcLayer {
    const char* name;
    int in, out;
};

// The three fully connected layers of one tower (each reads both towers).
static const FcLayer FCS[] = {{"fc6", 9216, 2048}, {"fc7", 4096, 2048}, {"fc8", 4096, 500}};

static void bench_conv(Bench& b, const ConvLayer& c) {
    if (!b.selects(c.name, {"conv_forward", "conv_backward_data", "conv_backward_weights"})) return;
    const int N = b.opt.batch;
    const long in = (long)N * c.C * c.H * c.W, out = (long)N * c.K * c.OH * c.OW;
    const long wn = (long)c.K * c.C * c.R * c.S;
    const double flop = 2.0 * N * c.K * c.OH * c.OW * (double)c.C * c.R * c.S;
    RandomBuffer x(in, 1), w(wn, 2, -0.01f, 0.01f), bias(c.K, 3), dy(out, 4);
    DeviceArray<float> y(out), dx(in), dw(wn), db(c.K);
    DeviceArray<float> workspace(std::max<size_t>(1, conv_workspace(
        N, c.C, c.H, c.W, c.K, c.R, c.S, c.stride, c.pad, 1, c.OH, c.OW)));
    const Workspace ws{workspace.ptr, workspace.count};
    char shape[96], name[64];
    snprintf(shape, sizeof(shape), "%dx%dx%d -> %dx%dx%d k%d s%d p%d", c.C, c.H, c.W, c.K, c.OH,
             c.OW, c.R, c.stride, c.pad);
    snprintf(name, sizeof(name), "%s conv_forward", c.name);
    b.run(name, shape, flop, true, 1, [&] {
        conv_forward(y.ptr, x.ptr, w.ptr, bias.ptr, N, c.C, c.H, c.W, c.K, c.R, c.S, c.stride, c.pad,
                     1, c.OH, c.OW, true, ws, b.opt.precision, b.stream);
    });
    snprintf(name, sizeof(name), "%s conv_backward_data", c.name);
    b.run(name, shape, flop, true, c.backward_data ? 1 : 0, [&] {
        conv_backward_data(dx.ptr, dy.ptr, w.ptr, N, c.C, c.H, c.W, c.K, c.R, c.S, c.stride, c.pad, 1,
                           c.OH, c.OW, ws, b.opt.precision, b.stream);
    });
    snprintf(name, sizeof(name), "%s conv_backward_weights", c.name);
    b.run(name, shape, flop, true, 1, [&] {
        conv_backward_weights(dw.ptr, db.ptr, dy.ptr, x.ptr, N, c.C, c.H, c.W, c.K, c.R, c.S, c.stride,
                              c.pad, 1, c.OH, c.OW, ws, b.opt.precision, b.stream);
    });
}

static void bench_fc(Bench& b, const FcLayer& f) {
    if (!b.selects(f.name, {"fc_forward", "fc_backward_data", "fc_backward_weights"})) return;
    const int N = b.opt.batch;
    const double flop = 2.0 * N * (double)f.in * f.out;
    RandomBuffer x((long)N * f.in, 5), w((long)f.out * f.in, 6, -0.01f, 0.01f), bias(f.out, 7),
        dy((long)N * f.out, 8);
    DeviceArray<float> y((long)N * f.out), dx((long)N * f.in), dw((long)f.out * f.in), db(f.out);
    DeviceArray<float> workspace(std::max<size_t>(1, fc_workspace(N, f.in, f.out)));
    const Workspace ws{workspace.ptr, workspace.count};
    char shape[96], name[64];
    snprintf(shape, sizeof(shape), "%d -> %d", f.in, f.out);
    snprintf(name, sizeof(name), "%s fc_forward", f.name);
    b.run(name, shape, flop, true, 1, [&] {
        fc_forward(y.ptr, x.ptr, w.ptr, bias.ptr, N, f.in, f.out, true, ws, b.opt.precision, b.stream);
    });
    snprintf(name, sizeof(name), "%s fc_backward_data", f.name);
    b.run(name, shape, flop, true, 1, [&] {
        fc_backward_data(dx.ptr, dy.ptr, w.ptr, N, f.in, f.out, ws, b.opt.precision, b.stream);
    });
    snprintf(name, sizeof(name), "%s fc_backward_weights", f.name);
    b.run(name, shape, flop, true, 1, [&] {
        fc_backward_weights(dw.ptr, db.ptr, dy.ptr, x.ptr, N, f.in, f.out, ws, b.opt.precision, b.stream);
    });
}

// ReLU backward runs after every conv and fc6/fc7 (the forward is fused into their epilogues).
static void bench_relu(Bench& b) {
    if (!b.selects("", {"relu_forward", "relu_backward"})) return;
    const int N = b.opt.batch;
    const long n = (long)N * 48 * 55 * 55;  // conv1's output, the largest
    // Elements that pass through relu_backward per tower and image in one training step,
    // relative to conv1's output: conv1..conv5 outputs, fc6, fc7.
    const double per_step = (48.0 * 55 * 55 + 128.0 * 27 * 27 + 2 * 192.0 * 13 * 13 +
                             128.0 * 13 * 13 + 2 * 2048.0) / (48.0 * 55 * 55);
    RandomBuffer x(n, 9), dy(n, 10);
    DeviceArray<float> y(n), dx(n);
    b.run("relu_forward", "conv1 output", 8.0 * n, false, 0, [&] {
        relu_forward(y.ptr, x.ptr, n, b.stream);
    });
    b.run("relu_backward", "conv1 output", 12.0 * n, false, per_step, [&] {
        relu_backward(dx.ptr, dy.ptr, x.ptr, n, b.stream);
    });
}

// The two normalisations, LRN across channels (lrn_*) and the 2012 code's within a map
// (spatial_norm_*), share their arguments: `op` names the pair, forward and backward.
typedef void (*NormForward)(float*, float*, const float*, int, int, int, int, int, float, float, float,
                            cudaStream_t);
typedef void (*NormBackward)(float*, const float*, const float*, const float*, const float*, int, int, int, int,
                             int, float, float, float, cudaStream_t);

static void bench_norm(Bench& b, const char* layer, const char* op, NormForward forward, NormBackward backward,
                       int C, int H, float alpha, float k) {
    char forward_name[48], backward_name[48];
    snprintf(forward_name, sizeof(forward_name), "%s_forward", op);
    snprintf(backward_name, sizeof(backward_name), "%s_backward", op);
    if (!b.selects(layer, {forward_name, backward_name})) return;
    const int N = b.opt.batch;
    const long n = (long)N * C * H * H;
    RandomBuffer x(n, 11, 0.0f, 10.0f), dy(n, 12);
    DeviceArray<float> y(n), scale(n), dx(n);
    char shape[96], name[96];
    snprintf(shape, sizeof(shape), "%dx%dx%d n5", C, H, H);
    snprintf(name, sizeof(name), "%s %s", layer, forward_name);
    b.run(name, shape, 12.0 * n, false, 1, [&] {
        forward(y.ptr, scale.ptr, x.ptr, N, C, H, H, 5, alpha, 0.75f, k, b.stream);
    });
    forward(y.ptr, scale.ptr, x.ptr, N, C, H, H, 5, alpha, 0.75f, k, b.stream);
    snprintf(name, sizeof(name), "%s %s", layer, backward_name);
    b.run(name, shape, 20.0 * n, false, 1, [&] {
        backward(dx.ptr, dy.ptr, x.ptr, y.ptr, scale.ptr, N, C, H, H, 5, alpha, 0.75f, k, b.stream);
    });
}

static void bench_maxpool(Bench& b, const char* layer, int C, int H, int OH) {
    if (!b.selects(layer, {"maxpool_forward", "maxpool_backward"})) return;
    const int N = b.opt.batch;
    const long in = (long)N * C * H * H, out = (long)N * C * OH * OH;
    RandomBuffer x(in, 13), dy(out, 14);
    DeviceArray<float> y(out), dx(in);
    char shape[96], name[64];
    snprintf(shape, sizeof(shape), "%dx%dx%d -> %dx%d 3/2", C, H, H, OH, OH);
    snprintf(name, sizeof(name), "%s maxpool_forward", layer);
    b.run(name, shape, 4.0 * (in + out), false, 1, [&] {
        maxpool_forward(y.ptr, x.ptr, N, C, H, H, 3, 2, OH, OH, b.stream);
    });
    snprintf(name, sizeof(name), "%s maxpool_backward", layer);
    b.run(name, shape, 4.0 * (out + 2 * in), false, 1, [&] {
        maxpool_backward(dx.ptr, dy.ptr, x.ptr, N, C, H, H, 3, 2, OH, OH, b.stream);
    });
}

static void bench_dropout(Bench& b) {
    if (!b.selects("", {"dropout_forward", "dropout_backward"})) return;
    const long n = (long)b.opt.batch * 2048;  // fc6 or fc7 output of one tower
    RandomBuffer x(n, 15);
    DeviceArray<float> y(n), dx(n);
    b.run("dropout_forward", "fc6/fc7 output, p 0.5", 8.0 * n, false, 2, [&] {
        dropout_forward(y.ptr, x.ptr, n, 0.5f, 1234, 6, 1, true, b.stream);
    });
    b.run("dropout_backward", "fc6/fc7 output, p 0.5", 8.0 * n, false, 2, [&] {
        dropout_backward(dx.ptr, x.ptr, n, 0.5f, 1234, 6, 1, b.stream);
    });
}

static void bench_softmax(Bench& b) {
    if (!b.selects("", {"softmax_cross_entropy", "softmax_forward"})) return;
    const int N = b.opt.batch, K = 1000;
    std::vector<int> labels(N);
    for (int i = 0; i < N; i++) labels[i] = (i * 7919) % K;
    RandomBuffer logits((long)N * K, 16, -5.0f, 5.0f);
    HostCopy<int> label(labels);
    DeviceArray<float> losses(N), dlogits((long)N * K), probs((long)N * K);
    DeviceArray<int> correct(2);
    b.run("softmax_cross_entropy", "1000 classes", 8.0 * N * K, false, 0.5, [&] {
        softmax_cross_entropy(losses.ptr, dlogits.ptr, correct.ptr, logits.ptr, label.ptr, N, K,
                              b.stream);
    });
    b.run("softmax_forward", "1000 classes", 8.0 * N * K, false, 0, [&] {
        softmax_forward(probs.ptr, logits.ptr, N, K, b.stream);
    });
}

static void bench_augment(Bench& b) {
    if (!b.selects("", {"augment_images"})) return;
    const int N = b.opt.batch, H = 256, W = 256, crop = 224;
    std::vector<uint8_t> pixels((size_t)N * H * W * 3), flips(N);
    std::vector<int> offsets(2 * N);
    for (size_t i = 0; i < pixels.size(); i++) pixels[i] = (uint8_t)(i * 2654435761u >> 24);
    for (int i = 0; i < N; i++) {
        offsets[2 * i] = (i * 13) % 33;
        offsets[2 * i + 1] = (i * 29) % 33;
        flips[i] = i & 1;
    }
    HostCopy<uint8_t> images(pixels), flip(flips);
    HostCopy<int> offset(offsets);
    RandomBuffer mean((long)H * W * 3, 17, 100.0f, 150.0f), alphas(3L * N, 18, -0.2f, 0.2f),
        eigval(3, 19, 0.0f, 1.0f), eigvec(9, 20);
    DeviceArray<float> out((long)N * 3 * crop * crop);
    const double bytes = (double)N * 3 * crop * crop * (1 + 4) + 3.0 * crop * crop * 4;
    // One augmentation per step feeds both towers: count it once per pair.
    b.run("augment_images", "256x256x3 u8 -> 3x224x224", bytes, false, 0.5, [&] {
        augment_images(out.ptr, images.ptr, mean.ptr, offset.ptr, flip.ptr, alphas.ptr, eigval.ptr,
                       eigvec.ptr, N, H, W, crop, false, 1.0f, b.stream);
    });
}

static void bench_sgd(Bench& b) {
    if (!b.selects("", {"sgd_update"})) return;
    const long n = 60965224 / 2;  // one tower's parameters
    RandomBuffer w(n, 21), v(n, 22, -1e-3f, 1e-3f), g(n, 23, -1e-3f, 1e-3f);
    b.run("sgd_update", "one tower's 30.5M parameters", 20.0 * n, false, 1, [&] {
        sgd_update(w.ptr, v.ptr, g.ptr, n, 1e-4f, 0.9f, 5e-4f, b.stream);
    });
}

static void usage() {
    printf("usage: bench_kernels [--batch N] [--iters N] [--warmup N] [--only SUBSTRING] [--precision P]\n"
           "  --batch N   images per batch (default: 128 on a GPU, 8 on the CPU build)\n"
           "  --iters N   timed calls per op (default: 10 on a GPU, 1 on the CPU build)\n"
           "  --warmup N  untimed calls first (default: 1 on a GPU, 0 on the CPU build)\n"
           "  --only S    only the ops whose name contains S (e.g. conv2, backward, fc)\n"
           "  --precision P  fp32 (default), tf32 or bf16: the conv and fc products' arithmetic\n");
}

static int parse_positive(const char* flag, const char* value, int minimum) {
    require(value != nullptr, "%s needs a value", flag);
    char* end = nullptr;
    long v = strtol(value, &end, 10);
    require(*value && *end == 0 && v >= minimum && v <= 1 << 20, "%s: bad value '%s'", flag, value);
    return (int)v;
}

static int run(int argc, char** argv) {
    try {
        Bench b;
#ifdef __CUDACC__
        const bool gpu = true;
#else
        const bool gpu = false;
#endif
        for (int i = 1; i < argc; i++) {
            const char* flag = argv[i];
            const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
            if (!strcmp(flag, "--help") || !strcmp(flag, "-h")) { usage(); return 0; }
            else if (!strcmp(flag, "--batch")) { b.opt.batch = parse_positive(flag, value, 1); i++; }
            else if (!strcmp(flag, "--iters")) { b.opt.iters = parse_positive(flag, value, 1); i++; }
            else if (!strcmp(flag, "--warmup")) { b.opt.warmup = parse_positive(flag, value, 0); i++; }
            else if (!strcmp(flag, "--only")) { require(value, "--only needs a value"); b.opt.only = value; i++; }
            else if (!strcmp(flag, "--precision")) {
                require(value, "--precision needs a value");
                b.opt.precision = parse_precision(flag, value);
                i++;
            }
            else fail("unknown flag '%s' (see --help)", flag);
        }
        if (b.opt.batch == 0) b.opt.batch = gpu ? 128 : 8;
        if (b.opt.iters == 0) b.opt.iters = gpu ? 10 : 1;
        if (b.opt.warmup < 0) b.opt.warmup = gpu ? 1 : 0;
        cudaCheck(cudaStreamCreate(&b.stream));
#ifdef __CUDACC__
        cudaDeviceProp prop;
        cudaCheck(cudaGetDeviceProperties(&prop, 0));
        printf("bench_kernels: %s, %d SMs, batch %d, %d timed calls per op, %s products\n", prop.name,
               prop.multiProcessorCount, b.opt.batch, b.opt.iters, PRECISION_NAMES[b.opt.precision]);
#else
        printf("bench_kernels: CPU build (CUDA-on-CPU runtime), batch %d, %d timed calls per op, %s products\n",
               b.opt.batch, b.opt.iters, PRECISION_NAMES[b.opt.precision]);
#endif
        printf("%-28s %-32s %13s %18s\n", "op (one tower)", "shape", "time", "speed");
        bench_augment(b);
        for (const ConvLayer& c : CONVS) bench_conv(b, c);
        bench_relu(b);
        bench_norm(b, "lrn1", "lrn", lrn_forward, lrn_backward, 48, 55, 1e-4f, 2.0f);
        bench_norm(b, "lrn2", "lrn", lrn_forward, lrn_backward, 128, 27, 1e-4f, 2.0f);
        bench_norm(b, "norm2", "spatial_norm", spatial_norm_forward, spatial_norm_backward, 128, 27, 1e-3f, 1.0f);
        bench_maxpool(b, "pool1", 48, 55, 27);
        bench_maxpool(b, "pool2", 128, 27, 13);
        bench_maxpool(b, "pool5", 128, 13, 6);
        for (const FcLayer& f : FCS) bench_fc(b, f);
        bench_dropout(b);
        bench_softmax(b);
        bench_sgd(b);
        cudaCheck(cudaStreamSynchronize(b.stream));
        cudaCheck(cudaStreamDestroy(b.stream));
        if (!*b.opt.only)
            printf("sum over one training step (both towers, kernels back to back, no exchange): "
                   "%.2f ms = %.1f images/s\n", b.step_ms, b.opt.batch * 1e3 / b.step_ms);
        return 0;
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}

}  // namespace kernel_bench

int main(int argc, char** argv) { return kernel_bench::run(argc, argv); }
