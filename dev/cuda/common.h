/*
dev/cuda/common.h: what the files of the kernel ladder share, included after
train_alexnet.cu (DeviceArray, elapsed_ms, fail/require come from there): the command
line, random inputs, the check against a host reference in double (of the inputs as
given, or rounded to a tensor-core format), and the timing.
*/
#pragma once
#ifdef __CUDACC__
#include "../tensor_core_ptx.cuh"  // the CPU build has these from dev/cuda_cpu.h
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
enum Format { FP32, TF32, BF16 };
static const char* const FORMAT_NAMES[] = {"fp32", "tf32", "bf16"};
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
            snprintf(gap, sizeof(gap), "  vs fp32 %5.2f u_%s*sum|terms|", most, FORMAT_NAMES[v.operands]);
        }
        printf("%d %-40s %s  max|diff| %8.2e = %7.1e tol  %s%s\n", v.number, v.name.c_str(),
               pass ? "PASS" : "FAIL", max_diff, worst, timing, gap);
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
    printf("%s\n%s, %d SMs; reference in double on %s, tolerance 10*sqrt(depth+1)*2^-24*sum|terms|"
           " (tf32/bf16 versions: of their rounded operands)\n", what, prop.name, prop.multiProcessorCount,
           checked);
}

// ----------------------------------------------------------------------------
// The tensor-core GEMM of the last versions of both files: any of train_alexnet.cu's
// problems (ConvForward, FcForward: its gathers and its store), its products done by
// mma.sync on operands rounded to TF32 or BF16, accumulated in FP32.

// Does the device have the sm_80 instructions (mma .tf32/.bf16, ldmatrix)? The CPU
// runtime answers as an H100.
static bool has_tensor_cores() {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    return prop.major >= 8;
}

// The two input formats as the kernel sees them. Shared tiles hold 32-bit words along k:
// one TF32 value or two BF16 values (the lower k in the low half), so that in words the
// two mma shapes are the same, m16n8k8 .tf32 and m16n8k16 .bf16 both consuming 16 rows
// x 8 words of A and 8 columns x 8 words of B, and everything but the packing and the
// mma itself is shared.
struct Tf32 {
    static constexpr int PER_WORD = 1;
    static __device__ __forceinline__ unsigned pack(const float (&x)[1]) { return cvt_rna_tf32(x[0]); }
    static __device__ __forceinline__ void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        mma_m16n8k8_tf32(acc, a, b, acc);
    }
};
struct Bf16 {
    static constexpr int PER_WORD = 2;
    static __device__ __forceinline__ unsigned pack(const float (&x)[2]) { return pack_bf16x2(x[0], x[1]); }
    static __device__ __forceinline__ void mma(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        mma_m16n8k16_bf16(acc, a, b, acc);
    }
};

// A block of 8 warps computes a 128x128 tile of C; warp w the 64x32 at rows
// (w / 4) * 64, columns (w % 4) * 32: 4 x 4 mma tiles of 16x8, 64 FP32 accumulators per
// lane. A slice is GEMM_TILE_K = 16 words of k (16 TF32 or 32 BF16 values), so
// train_alexnet.cu's GemmWalk, which deals a 16-deep slice out to the threads, deals
// our words; each slice is two mma steps of 8 words.
constexpr int MMA_TILE = 128, MMA_THREADS = 256, MMA_WARP_M = 64, MMA_WARP_N = 32;
constexpr int MMA_WORDS = GEMM_TILE_K;
// Row pitch of the shared tiles in words: 20, so that the 8 rows of 16 bytes that one
// ldmatrix matrix reads start at banks 20r mod 32 = 0, 20, 8, 28, 16, 4, 24, 12 and
// cover all 32 banks once; rows stay 16-byte aligned as ldmatrix requires.
constexpr int MMA_PITCH = MMA_WORDS + 4;

// Words of one operand's next slice, gathered and packed by this thread: the Walk's
// LOADS words, word w holding the PER_WORD values k = PER_WORD * w + e of the slice that
// starts at k0. Strided operands read the matrix directly; table operands add the
// slice's step table (see train_alexnet.cu, section 3) to the thread's origin.
template <typename Precision, typename Walk, bool STRIDED>
__device__ __forceinline__ void mma_fetch(unsigned (&next)[Walk::LOADS], const GemmGather& g,
                                          GemmOrigin origin, const int4* steps, int k0, int k_end) {
    UNROLL for (int i = 0; i < Walk::LOADS; i++) {
        float x[Precision::PER_WORD];
        UNROLL for (int e = 0; e < Precision::PER_WORD; e++) {
            const int k = Walk::k(threadIdx.x, i) * Precision::PER_WORD + e;
            if constexpr (STRIDED) x[e] = gemm_load_strided(g, origin, k0 + k, k_end);
            else x[e] = gemm_load(g, origin, steps[k]);
        }
        next[i] = Precision::pack(x);  // rounded once here, not at every fragment load
    }
}

// C = A B on tensor cores, C[m][n] = sum_k A[m][k] B[k][n] in FP32 over operands rounded
// by Precision::pack; stored by the problem (bias, ReLU, layout). One split, any batch
// (blockIdx.z).
//
// Shared memory: both operands k-contiguous, a_tile[m][word] and b_tile[n][word]
// (B stored as its transpose, the "col" of mma's row.col), double-buffered. Rounding
// happens when a thread packs its gathered values, before they are stored: each value
// is converted once per block, though 4 warps (A) or 2 (B) read it, and a BF16 tile is
// half the size.
//
// Fragments (g = lane / 4, t = lane % 4; in words, so for BF16 "word t" is the pair
// k = 2t, 2t+1):
//
//          A, 16 x 8 words              B, 8 words x 8 columns        C, 16 x 8 floats
//          word t      word t+4         row = word; col g             cols 2t, 2t+1
//   row g     a[0]        a[2]          word t:    b[0]          row g:     c[0] c[1]
//   row g+8   a[1]        a[3]          word t+4:  b[1]          row g+8:   c[2] c[3]
//
// ldmatrix (m8n8 .b16, no .trans) gives lane l, from each 8x8 matrix of 16-bit values,
// row l/4 and columns 2(l%4), 2(l%4)+1: in 32-bit words, row g and word t, exactly the
// (g, t) of every fragment above when the tiles are k-contiguous. So A's four registers
// are one ldmatrix.x4 of the matrices (rows 0-7, words 0-3), (rows 8-15, words 0-3),
// (rows 0-7, words 4-7), (rows 8-15, words 4-7): lane l passes the address of row l % 16,
// word 4 (l / 16); and one ldmatrix.x4 fetches b[0], b[1] of two neighbouring 8-column
// tiles: lane l passes column (l % 8) + 8 (l / 16), word 4 ((l / 8) % 2). .trans, which
// would read a k-major tile, transposes 16-bit elements and would split a TF32 word, so
// B is stored transposed instead. Per mma step a warp issues 4 + 2 ldmatrix.x4 for 16 mma.
//
// Loads: each thread keeps one row m of A and one column n of B (GemmWalk: consecutive
// words of a k-contiguous operand, else neighbouring n for a warp: coalesced either way)
// and gathers the next slice into registers while the warps multiply the current one;
// one barrier per slice. The step tables of table operands (written by lanes 0..
// SLICE_K-1 of warp 0 for A, warp 1 for B) run a slice ahead, as in gemm_kernel.
template <typename Precision, typename Problem>
__global__ void __launch_bounds__(MMA_THREADS) mma_gemm_kernel(Problem p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // no tf32/bf16 mma before sm_80; the host only launches it on sm_80 and later
#else
    constexpr int SLICE_K = MMA_WORDS * Precision::PER_WORD;
    using WalkA = GemmWalk<MMA_TILE, MMA_THREADS, Problem::a_k_contiguous>;
    using WalkB = GemmWalk<MMA_TILE, MMA_THREADS, Problem::b_k_contiguous>;
    SHARED(uint4, a_raw, [2][MMA_TILE][MMA_PITCH / 4]);  // uint4: 16-byte aligned rows
    SHARED(uint4, b_raw, [2][MMA_TILE][MMA_PITCH / 4]);
    SHARED(int4, a_steps, [2][SLICE_K]);
    SHARED(int4, b_steps, [2][SLICE_K]);
    auto a_tile = reinterpret_cast<unsigned(*)[MMA_TILE][MMA_PITCH]>(a_raw);
    auto b_tile = reinterpret_cast<unsigned(*)[MMA_TILE][MMA_PITCH]>(b_raw);

    const GemmDims d = p.dims;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const auto batch = p.batch(blockIdx.z);
    const int slices = (d.depth + SLICE_K - 1) / SLICE_K;
    const int m = blockIdx.y * MMA_TILE + WalkA::mn(tid), n = blockIdx.x * MMA_TILE + WalkB::mn(tid);
    const GemmOrigin a_origin = m < d.rows ? p.a_origin(batch, m) : GemmOrigin{0, GEMM_OUTSIDE, 0};
    const GemmOrigin b_origin = n < d.cols ? p.b_origin(batch, n) : GemmOrigin{0, GEMM_OUTSIDE, 0};

    // Step tables: entry k of slice s is GemmDigits at k + s * SLICE_K, a slice being
    // PER_WORD of gemm_kernel's advances.
    const bool writes_a = !Problem::a_strided && warp == 0 && lane < SLICE_K;
    const bool writes_b = !Problem::b_strided && warp == 1 && lane < SLICE_K;
    GemmDigits digits{0, 0, 0};  // started below by the table writers only
    if (writes_a) digits.start(p.a, lane);
    if (writes_b) digits.start(p.b, lane);
    auto write_steps = [&](int s, int buf) {
        if (!(writes_a || writes_b) || s >= slices) return;
        const GemmGather& g = writes_a ? p.a : p.b;
        (writes_a ? a_steps : b_steps)[buf][lane] = digits.step(g, s * SLICE_K + lane < d.depth);
        UNROLL for (int e = 0; e < Precision::PER_WORD; e++) digits.advance(g);
    };

    unsigned a_next[WalkA::LOADS], b_next[WalkB::LOADS];
    auto fetch = [&](int s, int buf) {  // slice s into registers, from step table buf
        mma_fetch<Precision, WalkA, Problem::a_strided>(a_next, p.a, a_origin, a_steps[buf], s * SLICE_K, d.depth);
        mma_fetch<Precision, WalkB, Problem::b_strided>(b_next, p.b, b_origin, b_steps[buf], s * SLICE_K, d.depth);
    };
    auto stash = [&](int buf) {  // the registers into tile buffer buf
        UNROLL for (int i = 0; i < WalkA::LOADS; i++) a_tile[buf][WalkA::mn(tid)][WalkA::k(tid, i)] = a_next[i];
        UNROLL for (int i = 0; i < WalkB::LOADS; i++) b_tile[buf][WalkB::mn(tid)][WalkB::k(tid, i)] = b_next[i];
    };

    const int warp_m = warp / (MMA_TILE / MMA_WARP_N) * MMA_WARP_M, warp_n = warp % (MMA_TILE / MMA_WARP_N) * MMA_WARP_N;
    float acc[MMA_WARP_M / 16][MMA_WARP_N / 8][4] = {};
    auto multiply = [&](int buf) {
        UNROLL for (int w0 = 0; w0 < MMA_WORDS; w0 += 8) {
            unsigned a[MMA_WARP_M / 16][4], b[MMA_WARP_N / 8][2];
            UNROLL for (int i = 0; i < MMA_WARP_M / 16; i++)
                ldmatrix_x4(a[i], &a_tile[buf][warp_m + 16 * i + lane % 16][w0 + 4 * (lane / 16)]);
            UNROLL for (int j = 0; j < MMA_WARP_N / 8; j += 2) {
                unsigned pair[4];  // b[0], b[1] of column tiles j and j+1
                ldmatrix_x4(pair, &b_tile[buf][warp_n + 8 * j + lane % 8 + 8 * (lane / 16)][w0 + 4 * (lane / 8 % 2)]);
                b[j][0] = pair[0], b[j][1] = pair[1], b[j + 1][0] = pair[2], b[j + 1][1] = pair[3];
            }
            UNROLL for (int i = 0; i < MMA_WARP_M / 16; i++)
                UNROLL for (int j = 0; j < MMA_WARP_N / 8; j++) Precision::mma(acc[i][j], a[i], b[j]);
        }
    };

    write_steps(0, 0);
    __syncthreads();
    fetch(0, 0);
    stash(0);
    write_steps(1, 1);
    __syncthreads();
    for (int s = 0; s < slices; s++) {  // multiply buffer s % 2 while slice s+1 fills the other
        const int buf = s % 2;
        if (s + 1 < slices) fetch(s + 1, buf ^ 1);
        write_steps(s + 2, buf);  // slice s's table: read by fetch(s), before the last barrier
        multiply(buf);
        if (s + 1 < slices) stash(buf ^ 1);  // slice s-1's tiles: multiplied before the last barrier
        __syncthreads();
    }

    const int g = lane / 4, t = lane % 4;
    UNROLL for (int i = 0; i < MMA_WARP_M / 16; i++)
        UNROLL for (int j = 0; j < MMA_WARP_N / 8; j++)
            UNROLL for (int r = 0; r < 4; r++) {
                const int row = blockIdx.y * MMA_TILE + warp_m + 16 * i + g + 8 * (r / 2);
                const int col = blockIdx.x * MMA_TILE + warp_n + 8 * j + 2 * t + r % 2;
                if (row < d.rows && col < d.cols) p.store(batch, row, col, acc[i][j][r]);
            }
#endif
}

// The problem on mma_gemm_kernel: one split, carries for the step tables.
template <typename Precision, typename Problem>
void mma_gemm_launch(Problem p, cudaStream_t stream) {
    gemm_carries(p.a);
    gemm_carries(p.b);
    p.dims.splits = 1;
    p.dims.depth_per_split = p.dims.depth;
    require(ceil_div(p.dims.rows, MMA_TILE) <= 65535 && p.dims.batches <= 65535, "mma_gemm: grid too large");
    dim3 grid(ceil_div(p.dims.cols, MMA_TILE), ceil_div(p.dims.rows, MMA_TILE), p.dims.batches);
    LAUNCH((mma_gemm_kernel<Precision, Problem>), grid, MMA_THREADS, 0, stream, p);
}

}  // namespace ladder
