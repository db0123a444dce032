/*
dev/cuda/common.h: what the files of the kernel ladder share, included after
train_alexnet.cu (DeviceArray, elapsed_ms, fail/require come from there): the command
line, random inputs, the check against a host reference in double (of the inputs as
given, or rounded to a tensor-core format), and the timing.
*/
#pragma once
#ifdef __CUDACC__
#include "../tensor_core_ptx.cuh"  // compiled here; the CPU build has these from dev/cuda_cpu.h
#endif
#include <functional>
#include <memory>
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
    int iters = ON_GPU ? 20 : 1;  // 0: check only
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
        else if (!strcmp(flag, "--iters")) { a.iters = parse_int(flag, value, 0, 1 << 16); i++; }
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

// The formats a version's matrix operands are read in: FP32 as stored, or rounded to
// one of the tensor cores' input formats, TF32 (10 mantissa bits) and BF16 (7).
using Format = Precision;  // train_alexnet.cu's FP32, TF32, BF16
// Unit roundoff of each format: half a unit in the last place, relative.
static const double UNIT_ROUNDOFF[] = {0x1p-24, 0x1p-11, 0x1p-8};

// x rounded to format f as the kernels round it: TF32 as cvt.rna.tf32.f32 (to nearest,
// ties away from zero), BF16 as cvt.rn.bf16x2.f32 (to nearest, ties to even). Written as
// arithmetic on the significand, not as the bit tricks of the device functions, so that
// the reference does not share their mistakes. Normal numbers only (the ladder's data
// lie in [-1, 1), nowhere near the subnormals).
static float round_to(Format f, float x) {
    if (f == FP32 || x == 0.0f) return x;
    const int bits = f == TF32 ? 11 : 8;     // significant bits, the leading one included
    int e;
    double scaled = ldexp(frexp(x, &e), bits);  // |scaled| in [2^(bits-1), 2^bits)
    return (float)ldexp(f == TF32 ? round(scaled) : nearbyint(scaled), e - bits);
}

static std::vector<float> round_to(Format f, std::vector<float> v) {
    for (float& x : v) x = round_to(f, x);
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
//
// Tensor-core versions round both operands to TF32 or BF16 first. The product of two
// rounded operands is exact in FP32 (22 significant bits at most) and the mma adds in
// FP32, so against a reference built from the *rounded* operands the same bound holds,
// with sum|terms| the sum of the rounded products: the tolerance stays that of FP32
// accumulation, and a fragment element in the wrong register still fails. (On a GPU the
// order and rounding inside the tensor cores are unspecified, and measured to truncate
// (Fasi et al., PeerJ Comput. Sci. 7:e330, 2021): twice u per addition and biased, which
// this bound, scaled by sum|terms| rather than |sum|, should still cover but has not been
// tried on one. The CPU runtime adds in k order, rounding to nearest even.)
struct Reference {
    long step = 1;
    std::vector<double> value, tol, abs_sum;  // of outputs 0, step, 2*step, ...: after ReLU

    // term_sums(i, sum, abs_sum): output i's exact value before ReLU and the sum of the
    // magnitudes of its terms. Outputs that cost over 2^28 multiply-adds in all are
    // sampled: every step-th, step coprime to `period` (the product of the output's inner
    // sizes), so that the samples still fall on every channel and pixel.
    template <typename TermSums>
    Reference(long outputs, int depth, long period, TermSums&& term_sums) {
        step = std::max(1L, (long)((double)outputs * depth / (1 << 28)));
        while (std::gcd(step, period) != 1) step++;
        const double tol_scale = 10.0 * sqrt(depth + 1.0) * UNIT_ROUNDOFF[FP32];
        for (long i = 0; i < outputs; i += step) {
            double sum = 0.0, abs_sum_i = 0.0;
            term_sums(i, sum, abs_sum_i);
            value.push_back(std::max(sum, 0.0));
            tol.push_back(tol_scale * abs_sum_i);
            abs_sum.push_back(abs_sum_i);
        }
    }
};

// The references of one run, one per operand format, each built (by `build`, from the
// inputs rounded to that format) when a version first needs it.
struct References {
    std::function<Reference(Format)> build;
    std::unique_ptr<Reference> built[3];
    explicit References(std::function<Reference(Format)> build_) : build(std::move(build_)) {}
    const Reference& operator()(Format f) {
        if (!built[f]) built[f] = std::make_unique<Reference>(build(f));
        return *built[f];
    }
};

// One row of the ladder: its name and how to launch it once.
struct Version {
    int number;
    std::string name;
    std::function<void()> launch;
    Format operands = FP32;  // checked against the reference of operands in this format
};

// Runs the selected versions one after the other: each fills `out` (reset to NaN
// first, so that an output a version forgets to write fails), is checked against the
// reference of its operand format, then timed. Prints one line per version; versions
// with rounded operands add, for information, their largest gap to the FP32 reference
// in units of the format's rounding bound u_f * sum|terms| (one product's operands
// rounded: up to about 2 of them). Returns the exit status (1 on any FAIL).
static int run_versions(const Args& a, const std::vector<Version>& versions, References& refs,
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
        const Reference& ref = refs(v.operands);
        double max_diff = 0.0, worst = 0.0;  // worst: the largest |diff| / tol
        bool pass = true;
        for (size_t j = 0; j < ref.value.size(); j++) {
            double diff = fabs(host[j * ref.step] - ref.value[j]);
            pass &= diff <= ref.tol[j];  // false for NaN
            max_diff = std::max(max_diff, diff != diff ? INFINITY : diff);
            worst = std::max(worst, diff != diff ? INFINITY : diff / ref.tol[j]);
        }
        all_pass &= pass;
        char timing[48] = "(not timed)";
        if (a.iters > 0) {
            float ms = elapsed_ms(stream, [&] {
                for (int i = 0; i < a.iters; i++) v.launch();
            }) / a.iters;
            snprintf(timing, sizeof(timing), "%9.3f ms %8.1f GFLOP/s", ms, flop / ms / 1e6);
        }
        char gap[48] = "";
        if (v.operands != FP32) {
            const Reference& exact = refs(FP32);
            double most = 0.0;
            for (size_t j = 0; j < exact.value.size(); j++) {
                double diff = fabs(host[j * exact.step] - exact.value[j]);
                double bound = UNIT_ROUNDOFF[v.operands] * exact.abs_sum[j];
                most = std::max(most, diff != diff ? INFINITY : diff / bound);
            }
            snprintf(gap, sizeof(gap), "  vs fp32 %5.2f u_%s*sum|terms|", most, PRECISION_NAMES[v.operands]);
        }
        printf("%d %-40s %s  max|diff| %8.2e = %7.1e tol  %s%s\n", v.number, v.name.c_str(),
               pass ? "PASS" : "FAIL", max_diff, worst, timing, gap);
        fflush(stdout);
    }
    return all_pass ? 0 : 1;
}

// A version's name for what gemm_launch chose: "conv_forward tf32 (auto: 128x128, 3 splits)".
static void describe_plan(char (&name)[64], const char* op, Precision precision, const GemmPlan& plan) {
    snprintf(name, sizeof(name), "%s %s (auto: %dx%d, %d split%s)", op, PRECISION_NAMES[precision], plan.tile_m,
             plan.tile_n, plan.dims.splits, plan.dims.splits > 1 ? "s" : "");
}

// The first lines of the report: the device and what the reference checks.
static void print_setup(const char* what, const Reference& ref, long outputs) {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    char checked[96];
    if (ref.step == 1) snprintf(checked, sizeof(checked), "all %ld outputs", outputs);
    else snprintf(checked, sizeof(checked), "%ld of %ld outputs (a stride of %ld)",
                  (long)ref.value.size(), outputs, ref.step);
    printf("%s\n%s, %d SMs; reference in double on %s, tolerance 10*sqrt(depth+1)*2^-24*sum|terms|"
           " (tf32/bf16 versions: of their rounded operands)\n", what, prop.name, prop.multiProcessorCount,
           checked);
}

// ----------------------------------------------------------------------------
// The tensor-core versions run train_alexnet.cu's mma_gemm_kernel (section 3).

// Does the device have the sm_80 instructions (mma .tf32/.bf16, ldmatrix)? The CPU
// runtime answers as an H100.
static bool has_tensor_cores() {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    return prop.major >= 8;
}

// The problem on mma_gemm_kernel<Operands> (MmaTf32, MmaBf16) with 128x128 tiles and one
// split, set up as gemm_launch does.
template <typename Operands, typename Problem>
void mma_gemm_launch(Problem p, cudaStream_t stream) {
    gemm_carries(p.a);
    gemm_carries(p.b);
    p.dims.splits = 1;
    p.dims.depth_per_split = p.dims.depth;
    mma_gemm_launch_tiles<Operands>(p, 128, 128, nullptr, stream);
}

// ----------------------------------------------------------------------------
// The BF16 alternative for activations: operands stored in BF16 (2 bytes a value) instead
// of FP32 rounded as they are loaded. mma_gemm_kernel<MmaBf16> runs on the same problem
// with each operand's gather reading 16-bit patterns (`bits`, the same layout as the FP32
// tensor), either one 2-byte load per value, or with PAIRS, one 4-byte load per word
// where both values of the word are neighbours in memory: plain strided operands with
// stride 1 (fc activations and weights, conv weights), rows of even length. The packing
// into a word is then free (the low value in the low half), rounding having been done
// when the tensor was stored (here: on the host, as a producing layer would do it).

template <bool PAIRS>
struct Bf16Gather : GemmGather {
    const uint16_t* bits = nullptr;
};

template <typename Problem, bool PAIRS>
struct StoredBf16 : Problem {
    Bf16Gather<PAIRS> a, b;  // hide the problem's FP32 gathers
    StoredBf16(const Problem& p, const uint16_t* a_bits, const uint16_t* b_bits) : Problem(p) {
        static_cast<GemmGather&>(a) = p.a, static_cast<GemmGather&>(b) = p.b;
        a.bits = a_bits, b.bits = b_bits;
        // the forward problems' strided rows start at multiples of the depth, which with one
        // split (mma_gemm_launch) is also where the reduction ends: even, so pairs are aligned
        require(!PAIRS || ((!Problem::a_strided || a.stride0 == 1) && (!Problem::b_strided || b.stride0 == 1)
                           && p.dims.depth % 2 == 0), "4-byte pair loads need stride-1 rows of even length");
    }
};

// mma_gemm_kernel's word of a BF16-stored operand (overloads train_alexnet.cu's mma_word).
template <typename Format, bool STRIDED, bool PAIRS>
__device__ __forceinline__ unsigned mma_word(const Bf16Gather<PAIRS>& g, GemmOrigin o, const int4* steps, int k,
                                             int k0, int k_end) {
    static_assert(Format::PER_WORD == 2, "two BF16 values a word");
    if constexpr (STRIDED && PAIRS)  // k0 + k and k_end are even: the pair is whole or past the end
        return k0 + k < k_end ? *reinterpret_cast<const unsigned*>(g.bits + (unsigned)(o.offset + k0 + k)) : 0u;
    unsigned lo, hi;
    if constexpr (STRIDED)
        lo = gemm_load_strided(g.bits, g, o, k0 + k, k_end), hi = gemm_load_strided(g.bits, g, o, k0 + k + 1, k_end);
    else
        lo = gemm_load(g.bits, g, o, steps[k]), hi = gemm_load(g.bits, g, o, steps[k + 1]);
    return lo | hi << 16;
}

// The BF16 patterns of v rounded to nearest even (round_to), for a BF16-stored operand.
static std::vector<uint16_t> bf16_bits(const std::vector<float>& v) {
    std::vector<uint16_t> bits(v.size());
    for (size_t i = 0; i < v.size(); i++) {
        const float x = round_to(BF16, v[i]);
        uint32_t word;
        memcpy(&word, &x, sizeof(word));
        bits[i] = (uint16_t)(word >> 16);
    }
    return bits;
}

}  // namespace ladder
