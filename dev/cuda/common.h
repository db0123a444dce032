/*
dev/cuda/common.h: what the files of the kernel ladder share, included after
train_alexnet.cu (DeviceArray, elapsed_ms, fail/require come from there): the command
line, random inputs, the check against a host reference in double, and the timing.
*/
#pragma once
#include <functional>
#include <numeric>
#include <string>
#include <vector>

namespace ladder {

#ifdef __CUDA_CPU__
constexpr bool ON_GPU = false;
#else
constexpr bool ON_GPU = true;
#endif

struct Args {
    int version = 0;  // 0: every version
    std::string layer;
    int batch = ON_GPU ? 128 : 2;
    int iters = ON_GPU ? 20 : 1;
    bool perturb = false;  // for tests/test_ladder.py: add 1e-2 to output 0 before the check
};

static int parse_int(const char* flag, const char* value, int lo, int hi) {
    require(value != nullptr, "%s needs a value", flag);
    char* end = nullptr;
    long v = strtol(value, &end, 10);
    require(*value && *end == 0 && v >= lo && v <= hi, "%s: bad value '%s'", flag, value);
    return (int)v;
}

// [VERSION] [--layer NAME] [--batch N] [--iters N] [--perturb]. False after --help.
static bool parse_args(int argc, char** argv, int versions, const char* usage, Args& a) {
    for (int i = 1; i < argc; i++) {
        const char* flag = argv[i];
        const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
        if (!strcmp(flag, "--help") || !strcmp(flag, "-h")) { printf("%s", usage); return false; }
        else if (!strcmp(flag, "--layer")) { require(value, "--layer needs a value"); a.layer = value; i++; }
        else if (!strcmp(flag, "--batch")) { a.batch = parse_int(flag, value, 1, 65535); i++; }
        else if (!strcmp(flag, "--iters")) { a.iters = parse_int(flag, value, 1, 1 << 16); i++; }
        else if (!strcmp(flag, "--perturb")) a.perturb = true;
        else if (flag[0] != '-' && a.version == 0) a.version = parse_int("VERSION", flag, 1, versions);
        else fail("unknown argument '%s' (see --help)", flag);
    }
    return true;
}

// The entry of `layers` that --layer names.
template <typename Layer, size_t N>
static const Layer& find_layer(const Layer (&layers)[N], const std::string& name) {
    for (const Layer& l : layers)
        if (name == l.name) return l;
    fail("unknown layer '%s' (see --help)", name.c_str());
}

// Uniform floats in [lo, hi) from a fixed seed.
static std::vector<float> uniform(size_t n, uint64_t seed, float lo, float hi) {
    std::vector<float> v(n);
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
    for (float& x : v) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        x = lo + (hi - lo) * (float)(state >> 40) * (1.0f / 16777216.0f);
    }
    return v;
}

// The host reference: exact values (double accumulation) of every step-th output.
//
// Tolerance per output. A float sum of depth products and the bias, in whatever order
// (one loop, tiles, split-K), passes each term through at most n = depth + 1
// roundings of u = 2^-24. The worst case, |error| <= n*u*sum|terms|, is useless for
// long sums: at depth 9216 (fc6) it is ~100 typical products. So we take Higham
// and Mary's probabilistic bound (SIAM J. Sci. Comput. 41(5), 2019): with independent,
// mean-zero rounding errors, |error| <= lambda*sqrt(n)*u*sum|terms| (to first order)
// except with probability 2n*exp(-lambda^2/2), below 1e-17 for lambda = 10:
//     |out - ref| <= 10 * sqrt(depth + 1) * 2^-24 * sum|terms|.
// ReLU only shrinks differences. With the data of random sign (inputs in [-1, 1),
// weights in +-1/sqrt(depth)) the actual error is far below this, while one product left
// out still exceeds it in most outputs (fc6: 61%; anything shorter: more).
struct Reference {
    long step = 1;
    std::vector<double> value, tol;  // of outputs 0, step, 2*step, ...: after ReLU

    // term_sums(i, sum, abs_sum): output i's exact value before ReLU and the sum of the
    // magnitudes of its terms. Outputs that cost over 2^28 multiply-adds in all are
    // sampled: every step-th, step coprime to `period` (the product of the output's inner
    // sizes), so that the samples still fall on every channel and pixel.
    template <typename TermSums>
    Reference(long outputs, int depth, long period, TermSums&& term_sums) {
        step = std::max(1L, (long)((double)outputs * depth / (1 << 28)));
        while (std::gcd(step, period) != 1) step++;
        const double tol_scale = 10.0 * sqrt(depth + 1.0) * ldexp(1.0, -24);
        for (long i = 0; i < outputs; i += step) {
            double sum = 0.0, abs_sum = 0.0;
            term_sums(i, sum, abs_sum);
            value.push_back(std::max(sum, 0.0));
            tol.push_back(tol_scale * abs_sum);
        }
    }
};

// One row of the ladder: its name and how to launch it once.
struct Version {
    int number;
    std::string name;
    std::function<void()> launch;
};

// Runs the selected versions one after the other: each fills `out` (reset to NaN
// first, so that an output a version forgets to write fails), is checked against `ref`,
// then timed. Prints one line per version; returns the exit status (1 on any FAIL).
static int run_versions(const Args& a, const std::vector<Version>& versions, const Reference& ref,
                        DeviceArray<float>& out, double flop, cudaStream_t stream) {
    std::vector<float> host(out.count);
    bool all_pass = true;
    for (const Version& v : versions) {
        if (a.version && v.number != a.version) continue;
        cudaCheck(cudaMemset(out.ptr, 0xFF, out.bytes()));
        v.launch();
        cudaCheck(cudaStreamSynchronize(stream));
        out.download(host.data());
        if (a.perturb) host[0] += 1e-2f;
        double max_diff = 0.0, worst = 0.0;  // worst: the largest |diff| / tol
        bool pass = true;
        for (size_t j = 0; j < ref.value.size(); j++) {
            double diff = fabs(host[j * ref.step] - ref.value[j]);
            pass &= diff <= ref.tol[j];  // false for NaN
            max_diff = std::max(max_diff, diff != diff ? INFINITY : diff);
            worst = std::max(worst, diff != diff ? INFINITY : diff / ref.tol[j]);
        }
        all_pass &= pass;
        float ms = elapsed_ms(stream, [&] {
            for (int i = 0; i < a.iters; i++) v.launch();
        }) / a.iters;
        printf("%d %-40s %s  max|diff| %8.2e = %7.1e tol  %9.3f ms %8.1f GFLOP/s\n", v.number,
               v.name.c_str(), pass ? "PASS" : "FAIL", max_diff, worst, ms, flop / ms / 1e6);
        fflush(stdout);
    }
    return all_pass ? 0 : 1;
}

// The first lines of the report: the device and what the reference checks.
static void print_setup(const char* what, const Reference& ref, long outputs) {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    char checked[96];
    if (ref.step == 1) snprintf(checked, sizeof(checked), "all %ld outputs", outputs);
    else snprintf(checked, sizeof(checked), "%ld of %ld outputs (a stride of %ld)",
                  (long)ref.value.size(), outputs, ref.step);
    printf("%s\n%s, %d SMs; reference in double on %s, tolerance 10*sqrt(depth+1)*2^-24*sum|terms|\n",
           what, prop.name, prop.multiProcessorCount, checked);
}

}  // namespace ladder
