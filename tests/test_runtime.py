"""Tests of the CUDA-on-CPU runtime (dev/cuda_cpu.h) through its own test kernels.

The kernels live in dev/runtime_test_kernels.cu; `make test` builds them into
build/libruntime_tests.so (and build/asan/libruntime_tests.so for the ASan checks).
RUNTIME_TESTS_LIB names another build (make test-asan uses the ASan one).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LIB_PATH = os.environ.get("RUNTIME_TESTS_LIB", os.path.join(ROOT, "build", "libruntime_tests.so"))
ASAN_LIB = os.path.join(ROOT, "build", "asan", "libruntime_tests.so")
UNDER_ASAN = "asan" in os.path.relpath(os.path.abspath(LIB_PATH), ROOT).split(os.sep)

CDEFS = """
const char* rt_last_error(void);
int rt_block_sum(const float* x, int n, int with_barrier, float* out);
int rt_transpose(const float* in, int rows, int cols, int with_barrier, float* out);
int rt_barrier_misuse(int scenario);
int rt_warp_op(int op, const unsigned* value, const int* arg, int width, unsigned active, int threads, unsigned* out);
int rt_warp_sum(const double* x, int threads, double* out);
int rt_uninitialised(int blocks, float* out, int* count);
int rt_write_past_end(int where);
int rt_fault(int kind);
int rt_launch(int kind, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, size_t smem);
int rt_peer_copy(const float* x, int n, float* out);
int rt_bad_copy(int kind);
int rt_stream_order(int n, int wait_event, int sync, float* result);
int rt_events(float* elapsed_ms);
int rt_barrier_votes(int k, int threads, int* out);
int rt_kernel_arguments(int kind, float* result);
int rt_device_attributes(int device, int* out);
int rt_occupancy(int kind, int block_size, size_t smem, int* blocks);
int rt_mma(int kind, int warps, const unsigned* a, const unsigned* b, const float* c, float* d);
int rt_convert(int kind, const float* x, int n, unsigned* out);
int rt_ldmatrix(int count, int trans, const unsigned short* mats, unsigned* got, unsigned* direct);
int rt_cp_async(int scenario, const float* x, float* out);
int rt_tensor_misuse(int scenario);
"""

# CUDA error codes (driver_types.h)
SUCCESS, INVALID_VALUE, INVALID_CONFIGURATION = 0, 1, 9
INVALID_DEVICE, ILLEGAL_ADDRESS, OUT_OF_RESOURCES, MISALIGNED_ADDRESS, LAUNCH_FAILURE = 101, 700, 701, 716, 719

SCHEDULES = ["forward", "reverse", "random"]


@pytest.fixture(scope="module")
def rt():
    if not os.path.exists(LIB_PATH):
        pytest.fail(f"{LIB_PATH} is missing: run `make test` (it builds it)")
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEFS)
    return ffi, ffi.dlopen(LIB_PATH)


def ptr(ffi, a):
    ctype = {np.float32: "float*", np.float64: "double*", np.uint32: "unsigned*", np.int32: "int*",
             np.uint16: "unsigned short*"}[a.dtype.type]
    return ffi.cast(ctype, a.ctypes.data)


def call(rt, name, *args):
    """Calls rt_<name>; returns (error code, message)."""
    ffi, lib = rt
    code = getattr(lib, "rt_" + name)(*[ptr(ffi, a) if isinstance(a, np.ndarray) else a for a in args])
    return code, ffi.string(lib.rt_last_error()).decode() if code else ""


def block_sum(rt, x, with_barrier):
    out = np.empty((x.size + 255) // 256, np.float32)
    assert call(rt, "block_sum", x, x.size, with_barrier, out) == (0, "")
    return out


def run_python(code, env=None, timeout=60):
    """Runs a snippet in a fresh interpreter that has `ffi`, `lib` (LIB) loaded."""
    prelude = textwrap.dedent(f"""
        import cffi, json, os, sys
        ffi = cffi.FFI()
        ffi.cdef({CDEFS!r})
        lib = ffi.dlopen(os.environ.get("LIB", {LIB_PATH!r}))
        def err(code):
            return [code, ffi.string(lib.rt_last_error()).decode() if code else ""]
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def misuse_reports(entry, scenarios, then=""):
    """Calls rt_<entry>(scenario) for each scenario under each schedule, then the snippet
    `then` (which may add to `out`), in a child process, so that a hang fails on the
    timeout; returns `out`: "schedule scenario" -> [error code, message]."""
    loop = textwrap.dedent(f"""
        out = {{}}
        for schedule in ["forward", "reverse", "random"]:
            os.environ["CUDA_CPU_SCHEDULE"] = schedule
            for scenario in range({scenarios}):
                out[f"{{schedule}} {{scenario}}"] = err(lib.rt_{entry}(scenario))
    """)
    result = run_python(loop + textwrap.dedent(then) + "print(json.dumps(out))\n", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- barriers -------------------------------------------------------------------------


def test_block_sum_with_barrier_is_right(rt, schedule):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    got = block_sum(rt, x, with_barrier=True)
    chunks = np.pad(x, (0, 24)).astype(np.float64).reshape(4, 256)
    # fp32 tree sum of 256 terms: each term passes through 8 roundings, so
    # |err| <= 8 * 2^-24 * sum|x| per chunk (the standard recursive-summation bound).
    bound = 8 * 2.0**-24 * np.abs(chunks).sum(axis=1)
    np.testing.assert_array_less(np.abs(got - chunks.sum(axis=1)), bound)


def test_results_are_bitwise_identical_across_schedules_and_workers(rt, monkeypatch):
    x = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    results = []
    for schedule in SCHEDULES:
        for workers in ("1", "2", "3"):
            monkeypatch.setenv("CUDA_CPU_SCHEDULE", schedule)
            monkeypatch.setenv("CUDA_CPU_WORKERS", workers)
            results.append(block_sum(rt, x, with_barrier=True))
    for r in results[1:]:
        assert r.tobytes() == results[0].tobytes()


def test_block_sum_without_barrier_is_wrong_under_some_schedule(rt, monkeypatch):
    x = np.random.default_rng(2).standard_normal(1024).astype(np.float32)
    exact = x.astype(np.float64).reshape(4, 256).sum(axis=1)
    wrong = []
    for schedule in SCHEDULES:
        monkeypatch.setenv("CUDA_CPU_SCHEDULE", schedule)
        got = block_sum(rt, x, with_barrier=False)
        if not np.allclose(got, exact, rtol=1e-4, atol=1e-4):  # a race, not a rounding difference
            wrong.append(schedule)
    assert wrong, "removing the barriers changed nothing: threads do not interleave like CUDA threads"


def test_transpose_needs_its_barrier(rt, schedule):
    rows, cols = 70, 45  # partial tiles on both edges
    a = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    out = np.empty((cols, rows), np.float32)
    assert call(rt, "transpose", a, rows, cols, 1, out) == (0, "")
    np.testing.assert_array_equal(out, a.T)


def test_transpose_without_barrier_is_wrong_under_some_schedule(rt, monkeypatch):
    rows, cols = 64, 64
    a = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    wrong = []
    for schedule in SCHEDULES:
        monkeypatch.setenv("CUDA_CPU_SCHEDULE", schedule)
        out = np.empty((cols, rows), np.float32)
        assert call(rt, "transpose", a, rows, cols, 0, out) == (0, "")
        if not np.array_equal(out, a.T):
            wrong.append(schedule)
    assert wrong


def test_barrier_misuse_is_reported_not_hung():
    """Each misuse, under each schedule: a launch failure that says what went wrong."""
    out = misuse_reports("barrier_misuse", 6, then="""
        x = ffi.new("float[256]", [1.0] * 256)
        s = ffi.new("float[1]")
        out["after"] = err(lib.rt_block_sum(x, 256, 1, s)) + [s[0]]
    """)
    expected = {
        0: ["divergent __syncthreads()", "runtime_test_kernels.cu:"],
        1: ["thread (3,0,0) of block (0,0,0)", "exited", "waits at __syncthreads() "],
        2: ["deadlock", "__syncthreads()", "__shfl_xor_sync"],
        3: ["thread (0,0,0) of block (0,0,0)", "its own lane is not in the mask"],
        4: ["thread (5,0,0) of block (0,0,0)", "exited", "__shfl_xor_sync"],
        5: ["__shfl_xor_sync"],
    }
    after = out.pop("after")
    for key, (code, message) in out.items():
        assert code == LAUNCH_FAILURE, (key, message)
        assert "kernel barrier_misuse" in message
        for fragment in expected[int(key.split()[1])]:
            assert fragment in message, (key, message)
    # lanes 0-15 may finish their shuffle before lane 16 names them (then they have exited)
    assert "mismatched warp operation" in out["reverse 5"][1] and "mask 0x0000ffff vs 0xffffffff" in out["reverse 5"][1]
    assert "which has exited" in out["forward 5"][1]
    # divergent call sites: both file:line pairs are named, and they differ
    sites = [w for w in out["forward 0"][1].split() if "runtime_test_kernels.cu:" in w]
    assert len(set(s.rstrip(",") for s in sites)) == 2
    assert after == [0, "", 256.0]  # the process lives on; the reset cleared the sticky error


@pytest.mark.parametrize("k", [1, 3, 1000])
def test_syncthreads_count_and_or(rt, schedule, k):
    threads = 200
    out = np.zeros((threads, 4), np.int32)
    assert call(rt, "barrier_votes", k, threads, out) == (0, "")
    t = np.arange(threads)
    expected = [(t % k == 0).sum(), int((t % k == 0).all()), int((t % k == 0).any()), (t < k).sum()]
    assert (out == expected).all()


def test_unusable_environment_values_are_said_once():
    result = run_python("""
        x = ffi.new("float[256]", [1.0] * 256)
        s = ffi.new("float[1]")
        print(lib.rt_block_sum(x, 256, 1, s), lib.rt_block_sum(x, 256, 1, s), s[0])
    """, env={"CUDA_CPU_SCHEDULE": "sideways", "CUDA_CPU_WORKERS": "many"})
    assert result.returncode == 0 and result.stdout.split() == ["0", "0", "256.0"]
    assert sorted(result.stderr.splitlines()) == [
        "cuda_cpu: ignoring CUDA_CPU_SCHEDULE=sideways (expected forward, reverse or random)",
        "cuda_cpu: ignoring CUDA_CPU_WORKERS=many (expected an integer)"]


# --- warp operations ----------------------------------------------------------------------

SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL = range(7)
UNDEFINED = 0xFFFFFFFF  # what the runtime returns when the source lane did not take part
SKIPPED = 0xDEADBEEF   # what the kernel writes for lanes outside the mask


def shuffle_model(op, value, arg, width, active, threads):
    """CUDA's shuffle rules, written from the CUDA C Programming Guide (not from the PTX
    formulas the runtime uses): width splits the warp into segments; idx reads lane
    arg mod width of the caller's segment; up/down shift within the segment and keep the
    caller's own value when the source would leave it; xor may read earlier segments,
    not later ones (then the caller's own value)."""
    out = np.full(threads, SKIPPED, np.uint64)
    arg = [int(a) for a in arg]
    for t in range(threads):
        lane, base = t % 32, t - t % 32
        if not active >> lane & 1:
            continue
        seg = lane - lane % width
        if op == SHFL_IDX:
            src = seg + arg[t] % width
        elif op == SHFL_UP:
            src = lane - arg[t] if lane - seg - arg[t] >= 0 else lane
        elif op == SHFL_DOWN:
            src = lane + arg[t] if lane - seg + arg[t] < width else lane
        else:
            src = lane ^ arg[t]
            if src >= seg + width:
                src = lane
        member = active >> src & 1 and base + src < threads
        out[t] = value[base + src] if member else UNDEFINED
    return out.astype(np.uint32)


def vote_model(op, value, active, threads):
    out = np.full(threads, SKIPPED, np.uint32)
    for base in range(0, threads, 32):
        lanes = [l for l in range(32) if active >> l & 1 and base + l < threads]
        ballot = sum(1 << l for l in lanes if value[base + l])
        r = {BALLOT: ballot, ANY: int(ballot != 0), ALL: int(ballot == sum(1 << l for l in lanes))}[op]
        for l in lanes:
            out[base + l] = r
    return out


@pytest.mark.parametrize("op", [SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR])
@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_shuffles_follow_cuda_rules(rt, schedule, op, width):
    rng = np.random.default_rng(100 * op + width)
    for threads, active in [(64, 0xFFFFFFFF), (48, 0xFFFFFFFF), (64, 0x0F0F33FF)]:
        value = rng.integers(0, 2**32, threads, dtype=np.uint32)
        # out-of-range arguments on purpose: lanes past the width, past the warp
        arg = rng.integers(0, 64 if op == SHFL_XOR else 40, threads).astype(np.int32)
        out = np.empty(threads, np.uint32)
        assert call(rt, "warp_op", op, value, arg, width, active, threads, out) == (0, "")
        np.testing.assert_array_equal(out, shuffle_model(op, value, arg, width, active, threads),
                                      err_msg=f"threads={threads} active={active:#x}")


@pytest.mark.parametrize("op", [BALLOT, ANY, ALL])
def test_votes_follow_cuda_rules(rt, schedule, op):
    rng = np.random.default_rng(op)
    for threads, active, density in [(64, 0xFFFFFFFF, 0.5), (40, 0xFFFFFFFF, 1.0), (64, 0x00FF00F0, 0.1), (64, 0xFFFFFFFF, 0.0)]:
        value = (rng.random(threads) < density).astype(np.uint32)
        arg = np.zeros(threads, np.int32)
        out = np.empty(threads, np.uint32)
        assert call(rt, "warp_op", op, value, arg, 32, active, threads, out) == (0, "")
        np.testing.assert_array_equal(out, vote_model(op, value, active, threads))


def test_invalid_shuffle_width_is_an_error(rt):
    v = np.zeros(32, np.uint32)
    code, message = call(rt, "warp_op", SHFL_XOR, v, np.ones(32, np.int32), 12, 0xFFFFFFFF, 32, np.empty(32, np.uint32))
    assert code == LAUNCH_FAILURE and "width 12 is not a power of 2" in message


def test_warp_sum_of_doubles(rt, schedule):
    # 1024 threads: 6144 warp operations between block barriers (there are none)
    x = np.random.default_rng(3).standard_normal(1024)
    out = np.empty(32)
    assert call(rt, "warp_sum", x, 1024, out) == (0, "")
    # fp64 tree sum of 32 terms: |err| <= 5 * 2^-53 * sum|x| (5 levels of rounding)
    sums = x.reshape(32, 32)
    np.testing.assert_array_less(np.abs(out - sums.sum(axis=1)), 5 * 2.0**-53 * np.abs(sums).sum(axis=1) + 1e-300)


# --- tensor-core instructions ---------------------------------------------------------------
# The models below are written from the PTX ISA and IEEE arithmetic, not from the runtime.


def as_bits(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def as_floats(bits):
    return np.ascontiguousarray(bits, np.uint32).view(np.float32)


def tf32_operand(bits):
    """What the tensor cores read of a .tf32 register: sign, exponent, top 10 mantissa bits."""
    return as_floats(bits & 0xFFFFE000)


def bf16_operand(bits16):
    return as_floats((bits16 & 0xFFFF).astype(np.uint32) << 16)


def tf32_pattern(x):
    """Values exact in tf32 (small integers, powers of 2) as the registers hold them."""
    bits = as_bits(x)
    assert not (bits & 0x1FFF).any()
    return bits


def bf16_pattern(x):
    bits = as_bits(x)
    assert not (bits & 0xFFFF).any()
    return bits >> 16


# kind: (rt_mma kind, K, encode exact values, decode register patterns)
MMA_KINDS = {"tf32": (0, 8, tf32_pattern, tf32_operand), "bf16": (1, 16, bf16_pattern, bf16_operand)}


def mma_model(a, b, c):
    """D = A B + C in the runtime's documented order: d = c, then d += a[:, k] b[k, :] for
    k = 0, 1, ..., K-1, each product exact in float32 and each addition rounded to float32."""
    d = c.astype(np.float32)
    for k in range(a.shape[1]):
        d = d + np.outer(a[:, k], b[k, :])
    return d


def run_mma(rt, kind, a_bits, b_bits, c):
    """One product per warp: a_bits (warps, 16, K), b_bits (warps, K, 8), c (warps, 16, 8)."""
    d = np.zeros(c.shape, np.float32)
    code, message = call(rt, "mma", MMA_KINDS[kind][0], c.shape[0], np.ascontiguousarray(a_bits, np.uint32),
                         np.ascontiguousarray(b_bits, np.uint32), np.ascontiguousarray(c, np.float32), d)
    assert code == 0, message
    return d


def layout_case(case, K, rng):
    """A (16 x K), B (K x 8), C (16 x 8) of small integers (exact in bf16 and tf32) whose
    product shows any element that reached the wrong place."""
    distinct_a = rng.permutation(16 * K).reshape(16, K) + 1.0  # at most 256: exact in bf16
    distinct_b = rng.permutation(K * 8).reshape(K, 8) + 1.0
    distinct_c = rng.permutation(128).reshape(16, 8) + 1.0
    picks_rows = np.eye(K)[np.concatenate([rng.permutation(K), rng.permutation(K)])[:16]]  # unit rows
    picks_columns = np.eye(K)[:, rng.permutation(K)[:8]]  # unit columns
    zeros = np.zeros
    return {
        "A rows pick rows of B": (picks_rows, distinct_b, zeros((16, 8))),
        "B columns pick columns of A": (distinct_a, picks_columns, zeros((16, 8))),
        "C passes through": (zeros((16, K)), zeros((K, 8)), distinct_c),
        "permutations": (picks_rows, picks_columns * (rng.permutation(8) + 1), distinct_c),
    }[case]


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
@pytest.mark.parametrize("case", ["A rows pick rows of B", "B columns pick columns of A", "C passes through",
                                  "permutations"])
def test_mma_fragment_layout(rt, schedule, kind, case):
    _, K, encode, _ = MMA_KINDS[kind]
    rng = np.random.default_rng(len(case) + K)
    warps = [layout_case(case, K, rng) for _ in range(2)]  # two warps, different matrices
    a, b, c = (np.stack([w[i] for w in warps]) for i in range(3))
    d = run_mma(rt, kind, encode(a), encode(b), c)
    np.testing.assert_array_equal(d, a @ b + c)  # small integers: every sum is exact


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
def test_mma_matches_the_documented_arithmetic_bitwise(rt, schedule, kind):
    """Random operands over a wide range of exponents: the order of the sums shows."""
    _, K, _, decode = MMA_KINDS[kind]
    rng = np.random.default_rng(K)
    def operand(shape):  # any register pattern: tf32 operands keep their low 13 bits
        x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-8, 9, shape)).astype(np.float32)
        return as_bits(x) if kind == "tf32" else as_bits(x) >> 16
    a, b = operand((2, 16, K)), operand((2, K, 8))
    c = (rng.standard_normal((2, 16, 8)) * 4).astype(np.float32)
    d = run_mma(rt, kind, a, b, c)
    expected = np.stack([mma_model(decode(a[w]), decode(b[w]), c[w]) for w in range(2)])
    np.testing.assert_array_equal(as_bits(d), as_bits(expected))


def test_mma_truncates_the_low_bits_of_tf32_operands(rt):
    """A's ones carry 0.75 of a tf32 unit in their low bits and B's integers 0x0FFF: read
    truncated, D = B's rows exactly; rounded (to 1 + 2^-10) or read whole, they are not."""
    rng = np.random.default_rng(5)
    a = as_bits(np.eye(8)[np.concatenate([rng.permutation(8), rng.permutation(8)])].astype(np.float32))
    a[a != 0] |= 0x1800
    b_values = (rng.permutation(64).reshape(8, 8) + 1).astype(np.float32)
    b = as_bits(b_values) | 0x0FFF
    d = run_mma(rt, "tf32", a[None], b[None], np.zeros((1, 16, 8), np.float32))[0]
    np.testing.assert_array_equal(d, tf32_operand(a) @ b_values)
    assert (tf32_operand(a) @ b_values == np.eye(8)[np.argmax(a, axis=1)] @ b_values).all()


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
@pytest.mark.parametrize("case, expected", [("ties", 1.0), ("cancellation", 0.0)])
def test_mma_sums_in_the_documented_order(rt, kind, case, expected):
    """ties: c = 1 and every product 2^-24; in order, each addition ties back to 1, while
    an exact sum or the products summed first give 1 + K 2^-24. cancellation: products
    2^24, 1, -2^24 after c = 0 give 0 in order (2^24 + 1 ties to 2^24) but 1 exactly or in
    reverse order."""
    _, K, encode, decode = MMA_KINDS[kind]
    if case == "ties":
        row, column, c = np.full(K, 2.0**-12), np.full(K, 2.0**-12), np.ones((16, 8))
    else:
        row, column, c = np.zeros(K), np.zeros(K), np.zeros((16, 8))
        row[:3], column[:3] = [2.0**12, 1.0, -(2.0**12)], [2.0**12, 1.0, 2.0**12]
    a, b = np.tile(row, (16, 1)), np.tile(column[:, None], (1, 8))
    d = run_mma(rt, kind, encode(a)[None], encode(b)[None], c[None].astype(np.float32))[0]
    assert (d == expected).all()
    assert (mma_model(decode(encode(a)), decode(encode(b)), c) == expected).all()
    assert (a @ b + c != expected).all()  # the exact result differs: the order is what is tested


def tf32_rna_model(x):
    """Round to nearest, ties away from zero, to 11 significant bits (tf32's subnormals
    are float32's, 13 bits coarser), in float64 arithmetic."""
    out = []
    for v in np.asarray(x, np.float32).astype(np.float64):
        _, e = np.frexp(abs(v))  # |v| = m 2^e, 0.5 <= m < 1
        unit = 2.0 ** max(e - 11, -136)
        out.append(np.copysign(np.floor(abs(v) / unit + 0.5) * unit, v))
    with np.errstate(over="ignore"):
        return as_bits(np.array(out).astype(np.float32))  # beyond the float32 range: infinity


def bf16_rn_model(x):
    """Round to nearest, ties to even, to 8 significant bits; NaN to the canonical 0x7FFF."""
    out = []
    for bits in as_bits(x):
        if bits & 0x7FFFFFFF > 0x7F800000:
            out.append(0x7FFF)
            continue
        v = float(bits.view(np.float32))
        _, e = np.frexp(abs(v))
        unit = 2.0 ** max(e - 8, -133)
        with np.errstate(over="ignore"):
            r = np.float32(np.copysign(np.round(abs(v) / unit) * unit, v))  # np.round: ties to even
        out.append(int(r.view(np.uint32)) >> 16)
    return np.array(out, np.uint32)


def convert(rt, kind, x):
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros(x.size // (1 + kind), np.uint32)
    assert call(rt, "convert", kind, x, out.size, out) == (0, "")
    return out


def test_cvt_rna_tf32(rt):
    edges = np.array([
        0x3F801000, 0xBF801000,  # ties: away from zero
        0x3F800FFF, 0x3F801001, 0x3F801FFF, 0x3FFFF000,  # below, above, carry into the exponent
        0x7F7FEFFF, 0x7F7FF000, 0x7F7FFFFF,  # the largest floats: a tie and above round to infinity
        0x00000FFF, 0x00001000, 0x007FF000, 0x80000000, 0,  # subnormals (a tie to the smallest normal), zeros
    ], np.uint32)
    rng = np.random.default_rng(6)
    random = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    finite = np.concatenate([edges, random[np.isfinite(as_floats(random))]])
    np.testing.assert_array_equal(convert(rt, 0, as_floats(finite)), tf32_rna_model(as_floats(finite)))
    # infinities and NaNs lose their low 13 bits and nothing else (ptxas's code for cvt.rna):
    # a NaN whose payload lies only there becomes an infinity
    special = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC01234, 0x7F800001], np.uint32)
    np.testing.assert_array_equal(convert(rt, 0, as_floats(special)),
                                  [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800000])


def test_pack_bf16x2_rounds_to_nearest_even_lo_in_the_low_half(rt):
    edges = np.array([
        0x3F808000, 0x3F818000, 0xBF808000,  # ties: to the even neighbour
        0x3F807FFF, 0x3F808001, 0x3FFF8000,  # below, above, carry into the exponent
        0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # the largest floats: a tie and above round to infinity
        0x00008000, 0x00018000, 0x80000000, 0,  # subnormal ties, zeros
        0x7F800000, 0xFF800000, 0x7FC00000, 0xFF812345,  # infinities, NaNs
    ], np.uint32)
    rng = np.random.default_rng(7)
    x = as_floats(np.concatenate([edges, rng.integers(0, 2**32, 4001, dtype=np.uint64).astype(np.uint32)]))
    got = convert(rt, 1, x)
    np.testing.assert_array_equal(got & 0xFFFF, bf16_rn_model(x[0::2]))
    np.testing.assert_array_equal(got >> 16, bf16_rn_model(x[1::2]))
    assert convert(rt, 1, [1.0, 2.0])[0] == 0x40003F80  # bf16(lo) | bf16(hi) << 16


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_gives_each_lane_its_elements(rt, schedule, count, trans):
    """The rows lie scattered in a padded shared tile; every element is distinct."""
    rng = np.random.default_rng(10 * count + trans)
    mats = rng.permutation(65536)[:count * 64].astype(np.uint16).reshape(count, 8, 8)
    got, direct = np.zeros((32, count), np.uint32), np.zeros((32, count), np.uint32)
    assert call(rt, "ldmatrix", count, trans, mats, got, direct) == (0, "")
    m = mats.transpose(0, 2, 1) if trans else mats  # .trans: lane l reads column l / 4
    row, col = np.arange(32) // 4, 2 * (np.arange(32) % 4)
    expected = np.stack([m[i, row, col].astype(np.uint32) | m[i, row, col + 1].astype(np.uint32) << 16
                         for i in range(count)], axis=1)
    np.testing.assert_array_equal(direct, expected)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("scenario, snapshots", [
    (0, ["stage 0"]),                      # commit, wait_all: the data
    (1, ["poison"]),                       # read before the wait: NaN
    (2, ["stage 0", "poison", "stage 1"]),  # wait<1> completes the older group only
    (3, ["poison", "stage 0"]),            # wait<0> leaves an uncommitted copy; wait_all commits it
])
def test_cp_async_lands_only_after_its_wait(rt, schedule, scenario, snapshots):
    x = np.arange(1, 513, dtype=np.float32)
    out = np.zeros((3, 64, 4), np.float32)
    assert call(rt, "cp_async", scenario, x, out) == (0, "")
    stages = x.reshape(2, 64, 4)
    for snapshot, want in zip(out, snapshots):
        if want == "poison":
            assert np.isnan(snapshot).all()
        else:
            np.testing.assert_array_equal(snapshot, stages[int(want[-1])])


def test_tensor_core_misuse_is_reported_not_hung():
    """Each misuse, under each schedule: a launch failure with CUDA's error code."""
    expected = {
        0: (LAUNCH_FAILURE, ["at mma_m16n8k8_tf32 ", "runtime_test_kernels.cu:", "needs all 32 lanes", "has 16 threads"]),
        1: (LAUNCH_FAILURE, ["exited", "at mma_m16n8k8_tf32 ", "runtime_test_kernels.cu:"]),
        2: (MISALIGNED_ADDRESS, ["at ldmatrix ", "runtime_test_kernels.cu:", "is not 16-byte aligned"]),
        3: (ILLEGAL_ADDRESS, ["at ldmatrix ", "runtime_test_kernels.cu:", "is not in shared memory"]),
        4: (MISALIGNED_ADDRESS, ["at cp_async_16 ", "runtime_test_kernels.cu:", "is not 16-byte aligned"]),
        5: (ILLEGAL_ADDRESS, ["at cp_async_16 ", "runtime_test_kernels.cu:", "is not in shared memory"]),
        6: (LAUNCH_FAILURE, ["mismatched warp operation", "at mma_m16n8k8_tf32 ", "at ldmatrix "]),
    }
    for key, (code, message) in misuse_reports("tensor_misuse", 7).items():
        want_code, fragments = expected[int(key.split()[1])]
        assert code == want_code and "kernel tensor_misuse" in message, (key, message)
        for fragment in fragments:
            assert fragment in message, (key, message)


# --- memory ---------------------------------------------------------------------------------


def test_unwritten_memory_reads_as_nan_and_int_atomics_count(rt, schedule):
    out = np.zeros((37, 64, 3), np.float32)
    count = np.zeros(1, np.int32)
    assert call(rt, "uninitialised", 37, out, count) == (0, "")
    assert np.isnan(out).all()  # static shared, dynamic shared, fresh cudaMalloc; every block
    assert count[0] == 37 * 64


@pytest.mark.parametrize("where, report", [(0, "heap-buffer-overflow"), (1, "use-after-poison")])
def test_out_of_bounds_write_is_caught_under_asan(where, report):
    if not os.path.exists(ASAN_LIB):
        pytest.fail(f"{ASAN_LIB} is missing: run `make test` (it builds it)")
    cxx = os.environ.get("CXX", "g++")
    runtime = " ".join(subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                       for name in ("libasan.so", "libubsan.so"))
    env = {"LIB": ASAN_LIB, "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0"}
    clean = run_python("""
        x = ffi.new("float[1000]", [1.0] * 1000)
        s = ffi.new("float[4]")
        print(err(lib.rt_block_sum(x, 1000, 1, s)), s[3])
    """, env=env)
    assert clean.returncode == 0 and "ERROR: AddressSanitizer" not in clean.stderr, clean.stderr[-3000:]
    assert clean.stdout.split() == ["[0,", "'']", "232.0"]  # fibers under ASan: no false alarm
    bad = run_python(f"print(err(lib.rt_write_past_end({where})))", env=env)
    assert bad.returncode != 0
    assert f"ERROR: AddressSanitizer: {report}" in bad.stderr, bad.stderr[-3000:]
    assert "write_past_end" in bad.stderr  # the report points at the kernel


@pytest.mark.no_asan
@pytest.mark.parametrize("kind, code, fragment", [(0, ILLEGAL_ADDRESS, "invalid memory access at address"),
                                                  (1, ILLEGAL_ADDRESS, "stack overflow")])
def test_kernel_faults_become_errors_not_crashes(rt, kind, code, fragment):
    if UNDER_ASAN:
        pytest.skip("ASan reports memory faults itself and ends the process")
    got, message = call(rt, "fault", kind)
    assert got == code
    assert "kernel fault" in message and "thread (7,0,0) of block (1,0,0)" in message and fragment in message
    x = np.ones(256, np.float32)
    assert block_sum(rt, x, True)[0] == 256.0  # and the process goes on


def test_trap_is_a_launch_failure(rt):
    code, message = call(rt, "fault", 2)
    assert code == LAUNCH_FAILURE and "thread (7,0,0) of block (1,0,0) called __trap()" in message


# --- launch configuration -------------------------------------------------------------------


@pytest.mark.parametrize("grid, block, smem, code", [
    ((1, 1, 1), (1024, 1, 1), 0, SUCCESS),
    ((1, 1, 1), (1025, 1, 1), 0, INVALID_CONFIGURATION),
    ((1, 1, 1), (32, 16, 4), 0, INVALID_CONFIGURATION),    # 2048 threads
    ((1, 1, 1), (1, 1, 65), 0, INVALID_CONFIGURATION),     # block.z <= 64
    ((1, 65536, 1), (32, 1, 1), 0, INVALID_CONFIGURATION), # grid.y <= 65535
    ((1, 1, 65536), (32, 1, 1), 0, INVALID_CONFIGURATION),
    ((2**31, 1, 1), (32, 1, 1), 0, INVALID_CONFIGURATION), # grid.x < 2^31
    ((0, 1, 1), (32, 1, 1), 0, INVALID_CONFIGURATION),
    ((1, 1, 1), (0, 1, 1), 0, INVALID_CONFIGURATION),
    ((1, 1, 1), (32, 1, 1), 48 * 1024, SUCCESS),
    ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, INVALID_VALUE),  # above 48 KB needs the opt-in
])
def test_launch_limits(rt, grid, block, smem, code):
    got, message = call(rt, "launch", 0, *grid, *block, smem)
    assert got == code, message
    if code:
        assert "empty_kernel" in message and "runtime_test_kernels.cu:" in message


# The device the runtime describes: an H100 SXM (sm_90). Attribute order as in
# rt_device_attributes: threads per block, shared memory per block, warp size, SMs,
# threads per SM, shared memory per SM, registers per SM.
H100 = dict(threads_per_block=1024, smem_per_block=48 * 1024, warp=32, sms=132,
            threads_per_sm=2048, smem_per_sm=228 * 1024, regs_per_sm=65536)


@pytest.mark.parametrize("device", [0, 1])
def test_device_attributes_describe_an_h100(rt, device):
    ffi, lib = rt
    out = np.zeros(7, np.int32)
    assert lib.rt_device_attributes(device, ptr(ffi, out)) == SUCCESS
    assert out.tolist() == list(H100.values())


def test_device_attributes_of_a_missing_device(rt):
    ffi, lib = rt
    out = np.zeros(7, np.int32)
    assert lib.rt_device_attributes(7, ptr(ffi, out)) == INVALID_DEVICE


def occupancy_reference(block_size, smem, smem_limit, regs_per_thread=128):
    """Blocks per SM by CUDA's occupancy rules on an H100: 32 blocks, 2048 threads (whole
    warps), registers per warp, and shared memory with 1 KB reserved per block."""
    if smem > smem_limit:
        return 0
    warps = -(-block_size // 32)
    return min(32, H100["threads_per_sm"] // (warps * 32), H100["regs_per_sm"] // (warps * 32 * regs_per_thread),
               H100["smem_per_sm"] // (smem + 1024))


@pytest.mark.parametrize("kind, block_size, smem", [
    (0, 256, 0),            # registers: 2 blocks of 256 threads at 128 registers
    (0, 128, 34816),        # registers: 4 (shared memory would allow 6)
    (0, 32, 0),             # registers: 16
    (0, 64, 40 * 1024),     # shared memory: 5
    (0, 64, 48 * 1024 + 4), # over the 48 KB a kernel gets without opting in: none
    (1, 64, 100 * 1024),    # opted in to 100 KB: 2 fit in 228 KB
    (0, 1024, 0),           # 1024 threads x 128 registers exceed the register file: none
])
def test_occupancy_follows_the_h100_limits(rt, kind, block_size, smem):
    ffi, lib = rt
    blocks = np.zeros(1, np.int32)
    assert lib.rt_occupancy(kind, block_size, smem, ptr(ffi, blocks)) == SUCCESS
    limit = 100 * 1024 if kind == 1 else 48 * 1024
    assert blocks[0] == occupancy_reference(block_size, smem, limit)


def test_occupancy_rejects_a_bad_block_size(rt):
    ffi, lib = rt
    blocks = np.zeros(1, np.int32)
    assert lib.rt_occupancy(0, 0, 0, ptr(ffi, blocks)) == INVALID_VALUE
    assert lib.rt_occupancy(0, 1025, 0, ptr(ffi, blocks)) == INVALID_VALUE


def test_dynamic_shared_memory_opt_in(rt):
    assert call(rt, "launch", 3, 1, 1, 1, 32, 1, 1, 100 * 1024) == (0, "")
    code, message = call(rt, "launch", 3, 1, 1, 1, 32, 1, 1, 100 * 1024 + 4)
    assert code == INVALID_VALUE and "dynamic shared memory" in message


def test_static_shared_memory_over_48k(rt):
    code, message = call(rt, "launch", 1, 1, 1, 1, 1, 1, 1, 0)
    assert code == OUT_OF_RESOURCES and "exceeds 48 KB" in message and "big_static_shared" in message


def test_kernel_parameters_over_4k(rt):
    code, message = call(rt, "launch", 2, 1, 1, 1, 1, 1, 1, 0)
    assert code == INVALID_VALUE and "bytes of parameters (limit 4096)" in message


# --- devices, copies, streams ------------------------------------------------------------------


def test_peer_copies_between_two_devices(rt):
    x = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    out = np.zeros_like(x)
    assert call(rt, "peer_copy", x, x.size, out) == (0, "")
    np.testing.assert_array_equal(out, 2 * x)  # scaling by 2 is exact


@pytest.mark.parametrize("kind, fragment", [(0, "argument 1 (0x"), (1, "argument 1 points to memory of device 0, "
                                                                       "and device 1 has no peer access to it")])
def test_kernel_arguments_a_gpu_could_not_use(rt, kind, fragment):
    code, message = call(rt, "kernel_arguments", kind, np.zeros(4, np.float32))
    assert code == ILLEGAL_ADDRESS and "kernel scale" in message and fragment in message, message


@pytest.mark.parametrize("kind", [2, 3])  # peer memory with access enabled; pinned host memory
def test_kernel_arguments_a_gpu_can_use(rt, kind):
    out = np.zeros(4, np.float32)
    assert call(rt, "kernel_arguments", kind, out) == (0, "")
    np.testing.assert_array_equal(out, [2, 4, 6, 8])


def test_one_device_has_no_peer(rt, monkeypatch):
    monkeypatch.setenv("CUDA_CPU_DEVICES", "1")
    x = np.ones(8, np.float32)
    code, _ = call(rt, "peer_copy", x, 8, np.zeros_like(x))
    assert code == INVALID_DEVICE


@pytest.mark.parametrize("kind, fragment", [(0, "is host memory, but the copy kind says device memory"),
                                            (1, "overrun its 128-byte allocation"),
                                            (2, "destination is on device 0, not 1"),
                                            (3, "not a pointer returned by cudaMalloc")])
def test_bad_copies_are_refused(rt, kind, fragment):
    code, message = call(rt, "bad_copy", kind)
    assert code == INVALID_VALUE and fragment in message, message


@pytest.mark.parametrize("deferred", ["0", "1"])
def test_deferred_streams_reveal_missing_synchronisation(rt, monkeypatch, deferred):
    monkeypatch.setenv("CUDA_CPU_DEFERRED", deferred)
    n = 300
    right = 2 * np.arange(1, n + 1, dtype=np.float32)
    seen = {}
    for wait_event, sync in [(1, 1), (1, 0), (0, 1)]:
        out = np.zeros(n, np.float32)
        assert call(rt, "stream_order", n, wait_event, sync, out) == (0, "")
        seen[wait_event, sync] = out
    np.testing.assert_array_equal(seen[1, 1], right)  # correct code is right in both modes
    if deferred == "0":  # work runs at once: the bugs stay hidden
        np.testing.assert_array_equal(seen[1, 0], right)
        np.testing.assert_array_equal(seen[0, 1], right)
    else:
        # no host sync: the pinned buffer still holds what the host wrote
        np.testing.assert_array_equal(seen[1, 0], -1.0)
        # no cudaStreamWaitEvent: the consumer ran before the producer, on NaN memory
        assert np.isnan(seen[0, 1]).all()


def test_event_timing(rt, monkeypatch):
    for deferred in ("0", "1"):
        monkeypatch.setenv("CUDA_CPU_DEFERRED", deferred)
        ms = np.zeros(1, np.float32)
        assert call(rt, "events", ms) == (0, "")
        assert 0.0 <= ms[0] < 10_000.0


@pytest.mark.no_asan
def test_fork_after_launches(rt):
    """The worker pool survives fork(): the child starts its own (no OpenMP-style hang)."""
    if UNDER_ASAN:
        pytest.skip("fork under ASan is not part of this check")
    x = np.ones(512, np.float32)
    block_sum(rt, x, True)
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = (block_sum(rt, x, True) == 256.0).all()
        finally:
            os._exit(0 if ok else 1)
    import time

    deadline = time.time() + 30
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child hung in a kernel launch")
