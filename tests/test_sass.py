"""dev/sass.py, the static SASS report: the listing parser, the instruction classes, the
loop finder and per-slice counts on hand-written listings in nvdisasm's format, the
cuobjdump parsers, and the occupancy formula on hand-computed cases. Only the slow test
needs nvcc and the cuobjdump/nvdisasm wheels."""
import importlib.util
import os
import shutil
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_sass():
    spec = importlib.util.spec_from_file_location("sass", os.path.join(ROOT, "dev", "sass.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["sass"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sass = load_sass()

# One slice loop (.L_x_1, 0x60-0x150) with the k loop fully unrolled, a forward branch
# before it, and the self-loop and padding that end every function.
SIMPLE = textwrap.dedent("""\
    //--------------------- .text._Z6simplev --------------------------
    \t.section\t.text._Z6simplev,"ax",@progbits
    \t.align\t128
            .global         _Z6simplev
            .type           _Z6simplev,@function
            .size           _Z6simplev,(.L_x_3 - _Z6simplev)
            .other          _Z6simplev,@"STO_CUDA_ENTRY STV_DEFAULT"
    _Z6simplev:
    .text._Z6simplev:
            /*0000*/                   LDC R1, c[0x0][0x28] ;
            /*0010*/                   S2R R0, SR_TID.X ;
            /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
            /*0030*/               @P0 BRA `(.L_x_0) ;
            /*0040*/                   LDG.E R2, desc[UR4][R4.64] ;
    .L_x_0:
            /*0050*/                   MOV R3, RZ ;
    .L_x_1:
            /*0060*/                   STS [R6], R2 ;
            /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
            /*0080*/              @!P1 LDG.E.128 R8, desc[UR4][R4.64+0x40] ;
            /*0090*/                   LDS.U.128 R12, [R7] ;
            /*00a0*/                   LDS.64 R16, [R7+0x100] ;
            /*00b0*/                   FFMA R20, R12.reuse, R16.reuse, R20 ;
            /*00c0*/                   FFMA R21, R12, R17.reuse, R21 ;
            /*00d0*/                   FFMA R22, R13.reuse, R16, R22 ;
            /*00e0*/                   FFMA R23, R13, R17, R23 ;
            /*00f0*/                   LDS R18, [R7+0x200] ;
            /*0100*/                   FFMA R24, R14, R18, R24 ;
            /*0110*/                   FFMA R25, R15, R18, R25 ;
            /*0120*/                   IADD3 R3, R3, 0x1, RZ ;
            /*0130*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
            /*0140*/                   ISETP.GE.AND P2, PT, R3, R9, PT ;
            /*0150*/              @!P2 BRA `(.L_x_1) ;
            /*0160*/                   STG.E desc[UR4][R10.64], R20 ;
            /*0170*/                   EXIT ;
    .L_x_2:
            /*0180*/                   BRA `(.L_x_2);
            /*0190*/                   NOP;
    .L_x_3:
    """)

# Loops, outermost first:
#   0x10-0x30   a small loop with 2 FFMA
#   0x40-0x160  a loop over tiles (persistent kernel), around
#   0x50-0x140  the slice loop: global load, shared store, barriers, around
#   0x80-0xa0   a loop without FFMA, and
#   0xb0-0x120  the k loop, unrolled only partly: 4 FFMA a trip
NESTED = textwrap.dedent("""\
    \t.section\t.text._Z6nestedv,"ax",@progbits
    _Z6nestedv:
    .text._Z6nestedv:
            /*0000*/                   S2R R0, SR_TID.X ;
    .L_x_10:
            /*0010*/                   FFMA R1, R2, R3, R1 ;
            /*0020*/                   FFMA R4, R2, R3, R4 ;
            /*0030*/               @P0 BRA `(.L_x_10) ;
    .L_x_11:
            /*0040*/                   IMAD R5, R0, 0x40, RZ ;
    .L_x_12:
            /*0050*/                   LDG.E R6, desc[UR4][R8.64] ;
            /*0060*/                   STS [R5], R6 ;
            /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
    .L_x_13:
            /*0080*/                   IADD3 R7, R7, -0x1, RZ ;
            /*0090*/                   ISETP.NE.AND P1, PT, R7, RZ, PT ;
            /*00a0*/               @P1 BRA `(.L_x_13) ;
    .L_x_14:
            /*00b0*/                   LDS.128 R12, [R5+0x10] ;
            /*00c0*/                   LDS R16, [R5+0x200] ;
            /*00d0*/                   FFMA R20, R12.reuse, R16.reuse, R20 ;
            /*00e0*/                   FFMA R21, R13.reuse, R16.reuse, R21 ;
            /*00f0*/                   FFMA R22, R14.reuse, R16.reuse, R22 ;
            /*0100*/                   FFMA R23, R15, R16, R23 ;
            /*0110*/                   VIADD R5, R5, 0x4 ;
            /*0120*/              @!P2 BRA `(.L_x_14) ;
            /*0130*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
            /*0140*/              @!P3 BRA `(.L_x_12) ;
            /*0150*/                   STG.E desc[UR4][R10.64], R20 ;
            /*0160*/              @!P4 BRA `(.L_x_11) ;
            /*0170*/                   EXIT ;
    """)

# cuobjdump -sass style: no labels, hexadecimal targets; two branches back to one header.
HEX_TARGETS = textwrap.dedent("""\
    \t.section\t.text._Z3hexv,"ax",@progbits
            /*0000*/                   MOV R0, RZ ;
            /*0010*/                   FFMA R1, R1, R1, R1 ;
            /*0020*/               @P0 BRA 0x10 ;
            /*0030*/                   FFMA R2, R2, R2, R2 ;
            /*0040*/               @P1 BRA 0x10 ;
            /*0050*/                   EXIT ;
    """)


def counts(**nonzero):
    return {col: float(nonzero.get(col.replace(".", "_"), 0)) for col in sass.COLUMNS}


def test_parse_sass_functions_instructions_labels():
    fns = sass.parse_sass(SIMPLE + "\n" + NESTED)
    assert list(fns) == ["_Z6simplev", "_Z6nestedv"]
    simple = fns["_Z6simplev"]
    assert len(simple.instrs) == 26
    assert simple.instrs[3] == sass.Instr(0x30, "BRA", "`(.L_x_0)")  # guard @P0 dropped
    assert simple.instrs[8] == sass.Instr(0x80, "LDG.E.128", "R8, desc[UR4][R4.64+0x40]")
    assert simple.instrs[-1] == sass.Instr(0x190, "NOP", "")
    assert simple.labels == {"_Z6simplev": 0x0, ".text._Z6simplev": 0x0, ".L_x_0": 0x50,
                             ".L_x_1": 0x60, ".L_x_2": 0x180}
    assert fns["_Z6nestedv"].labels[".L_x_14"] == 0xb0


@pytest.mark.parametrize("opcode, column", [
    ("FFMA", "FFMA"), ("FFMA.FTZ", "FFMA"), ("HMMA.1688.F32.TF32", "HMMA"),
    ("LDS", "LDS"), ("LDS.U8", "LDS"), ("LDS.U", "LDS"), ("LDS.64", "LDS.64"), ("LDS.U.64", "LDS.64"),
    ("LDS.128", "LDS.128"), ("LDS.U.128", "LDS.128"), ("LDSM.16.M88.4", "LDSM"),
    ("STS", "STS"), ("STS.128", "STS"), ("LDG.E.128.CONSTANT", "LDG"),
    ("LDGSTS.E.BYPASS.LTC128B.128", "LDGSTS"), ("BAR.SYNC.DEFER_BLOCKING", "BAR"),
    ("IMAD.WIDE", "other"), ("LDL", "other"), ("LDGDEPBAR", "other"), ("ULDC.64", "other"),
])
def test_column(opcode, column):
    assert sass.column(opcode) == column


def test_macs():
    assert sass.macs("FFMA") == 1
    assert sass.macs("HMMA.1688.F32.TF32") == 16 * 8 * 8 / 32
    assert sass.macs("HMMA.16816.F32.BF16") == 16 * 8 * 16 / 32
    assert sass.macs("FMUL") == 0 and sass.macs("DFMA") == 0


def test_find_loops_nested_forest():
    top = sass.find_loops(sass.parse_sass(NESTED)["_Z6nestedv"])
    assert [(lp.start, lp.end) for lp in top] == [(0x10, 0x30), (0x40, 0x160)]
    (slice_loop,) = top[1].children
    assert (slice_loop.start, slice_loop.end) == (0x50, 0x140)
    assert [(lp.start, lp.end, lp.macs) for lp in slice_loop.children] == [(0x80, 0xa0, 0), (0xb0, 0x120, 4)]
    assert slice_loop.children[1].parent is slice_loop


def test_find_loops_hex_targets_one_loop_per_header():
    (loop,) = sass.find_loops(sass.parse_sass(HEX_TARGETS)["_Z3hexv"])
    assert (loop.start, loop.end, len(loop.body), loop.macs) == (0x10, 0x40, 4, 2)


def test_simple_loop_per_slice():
    fn = sass.parse_sass(SIMPLE)["_Z6simplev"]
    r = sass.reduction_loop(fn, 6)  # the body is one slice; the self-loop at 0x180 is no loop
    assert (r.loop, r.body_macs, r.slices, r.other_loops, r.inner_loops) == ("0x60-0x150", 6, 1, 0, 0)
    assert r.counts == counts(FFMA=6, LDS=1, LDS_64=1, LDS_128=1, STS=1, LDG=1, BAR=2, other=3)
    assert r.total == 16
    assert r.fma_share == pytest.approx(37.5)
    assert r.fma_per_shared_load == 2


def test_simple_loop_holding_two_slices():
    r = sass.reduction_loop(sass.parse_sass(SIMPLE)["_Z6simplev"], 3)
    assert r.slices == 2
    assert r.counts == counts(FFMA=3, LDS=0.5, LDS_64=0.5, LDS_128=0.5, STS=0.5, LDG=0.5, BAR=1, other=1.5)
    assert r.fma_share == pytest.approx(37.5)


def test_nested_partial_k_loop_counts_in_its_slice_loop():
    # 16 FFMA per slice: the k loop (4 FFMA) runs 4 times per trip of the slice loop;
    # the tile loop around is not the slice loop, the loop without FFMA counts once.
    r = sass.reduction_loop(sass.parse_sass(NESTED)["_Z6nestedv"], 16)
    assert (r.loop, r.body_macs, r.slices) == ("0x50-0x140, inner 0xb0-0x120 x4", 4, 1)
    assert (r.other_loops, r.inner_loops) == (1, 1)
    # the slice loop's 16 instructions once, plus 3 more times the k loop's 8
    assert r.counts == counts(FFMA=16, LDS=4, LDS_128=4, STS=1, LDG=1, BAR=2, other=6 + 3 * 2)
    assert r.total == 40
    assert r.fma_share == pytest.approx(40.0)
    assert r.fma_per_shared_load == 2


def test_nested_k_loop_with_whole_slices_is_the_slice_loop():
    r = sass.reduction_loop(sass.parse_sass(NESTED)["_Z6nestedv"], 2)
    assert (r.loop, r.slices, r.inner_loops) == ("0xb0-0x120", 2, 0)
    assert r.counts == counts(FFMA=2, LDS=0.5, LDS_128=0.5, other=1)


def test_unknown_slice_size_counts_the_innermost_bulk_loop():
    r = sass.reduction_loop(sass.parse_sass(NESTED)["_Z6nestedv"], None)
    assert (r.loop, r.slices) == ("0xb0-0x120", None)
    assert r.counts == counts(FFMA=4, LDS=1, LDS_128=1, other=2)


def test_no_loop_with_ffma():
    listing = "\t.section\t.text._Z1kv,\"ax\",@progbits\n        /*0000*/   FFMA R1, R1, R1, R1 ;\n"
    assert sass.reduction_loop(sass.parse_sass(listing)["_Z1kv"], 16) is None
    assert sass.reduction_loop(sass.parse_sass(HEX_TARGETS.replace("FFMA", "FMUL"))["_Z3hexv"], 16) is None


def test_fma_per_shared_load_without_shared_loads():
    r = sass.reduction_loop(sass.parse_sass(HEX_TARGETS)["_Z3hexv"], 2)
    assert r.fma_per_shared_load == float("inf") and r.fma_share == 50


H100, A100 = sass.SM_LIMITS[90], sass.SM_LIMITS[80]


@pytest.mark.parametrize("sm, regs, threads, smem, blocks, warps, limit", [
    # 128 regs -> 4096 per warp, 4 warps per sub-partition: 16 warps = 2 blocks of 8
    (H100, 128, 256, 17664, 2, 16, "registers"),
    # 255 regs -> 8160, rounded up to 8192 per warp: 2 warps per sub-partition
    (H100, 255, 64, 0, 4, 8, "registers"),
    # 40 regs -> 1280 per warp: 12 warps per sub-partition (not 51 per SM): 16 blocks of 3
    (H100, 40, 96, 0, 16, 48, "registers"),
    # a block's warps are spread over the 4 sub-partitions: 255 regs x 32 warps does not fit
    (H100, 255, 1024, 0, 0, 0, "registers"),
    (H100, 16, 1024, 0, 2, 64, "warps"),
    # 32 regs: 64 warps fill the registers exactly as they fill the warp slots
    (H100, 32, 1024, 0, 2, 64, "registers, warps"),
    (H100, 16, 32, 0, 32, 32, "blocks"),
    # 48 KB + 1 KB reserved = 50176 B: 233472 // 50176 = 4 blocks
    (H100, 32, 128, 48 * 1024, 4, 16, "shared memory"),
    (H100, 32, 128, 100 * 1024, 2, 8, "shared memory"),
    (H100, 32, 128, 227 * 1024, 1, 4, "shared memory"),
    (H100, 32, 128, 227 * 1024 + 1, 0, 0, "shared memory"),
    # 100 B + 1024 reserved, rounded up to 1152: 202 blocks by shared memory, 32 by block slots
    (H100, 16, 32, 100, 32, 32, "blocks"),
    (A100, 32, 128, 48 * 1024, 3, 12, "shared memory"),
])
def test_occupancy(sm, regs, threads, smem, blocks, warps, limit):
    occ = sass.occupancy(sm, regs, threads, smem)
    assert (occ.blocks, occ.warps, occ.limit) == (blocks, warps, limit)
    assert occ.percent == pytest.approx(100 * warps / 64)


def test_kernel_shared_bytes_counts_the_reserved_kilobyte_once():
    assert sass.kernel_shared_bytes(90, 17664, 0) == 16640  # 64x65 + 64x65 floats, from 0x400 on
    assert sass.kernel_shared_bytes(80, 16640, 0) == 16640
    assert sass.kernel_shared_bytes(90, 0, 4096) == 4096    # no static variables, no reserved window
    assert sass.kernel_shared_bytes(90, 1024 + 512, 8192) == 512 + 8192


def test_parse_res_usage():
    text = textwrap.dedent("""\

        Resource usage:
         Common:
          GLOBAL:0
         Function _Z16gemm_tile_kernelILi64E9FcForwardEvT0_:
          REG:128 STACK:0 SHARED:17664 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
         Function _Z6spillsv:
          REG:255 STACK:48 SHARED:0 LOCAL:8 CONSTANT[0]:528 TEXTURE:0 SURFACE:0 SAMPLER:0
        """)
    assert sass.parse_res_usage(text) == {
        "_Z16gemm_tile_kernelILi64E9FcForwardEvT0_": sass.Resources(128, 0, 17664, 0),
        "_Z6spillsv": sass.Resources(255, 48, 0, 8),
    }


def test_parse_max_threads():
    text = textwrap.dedent("""\
        .nv.info._Z6boundsv
        \t<0x4>
        \tAttribute:\tEIATTR_MAXREG_COUNT
        \tFormat:\tEIFMT_HVAL
        \tValue:\t0x80
        \t<0x8>
        \tAttribute:\tEIATTR_MAX_THREADS
        \tFormat:\tEIFMT_SVAL
        \tValue:\t0x100 0x1 0x1 
        .nv.info._Z8reqntidv
        \tAttribute:\tEIATTR_REQNTID
        \tFormat:\tEIFMT_SVAL
        \tValue:\t0x20 0x4 0x1 
        .nv.info._Z8unboundv
        \tAttribute:\tEIATTR_CUDA_API_VERSION
        \tFormat:\tEIFMT_SVAL
        \tValue:\t0x82 
        """)
    assert sass.parse_max_threads(text) == {"_Z6boundsv": 256, "_Z8reqntidv": 128}


@pytest.mark.parametrize("demangled, short", [
    ("void gemm_kernel<128, 128, ConvForward>(ConvForward)", "gemm_kernel<128, 128, ConvForward>"),
    ("void gemm_tile_kernel<64, (anonymous namespace)::P>((anonymous namespace)::P)", "gemm_tile_kernel<64, P>"),
    ("relu_forward_kernel(float*, float const*, long)", "relu_forward_kernel"),
    ("_Z6simplev", "_Z6simplev"),
])
def test_short_name(demangled, short):
    assert sass.short_name(demangled) == short


def test_old_tile_geometry():
    geometry = sass.Geometry(os.path.join(ROOT, "no-such-lib.so"))
    assert geometry.tile("gemm_tile_kernel<64, ConvForward>") == sass.Tile(256, 512, 0)
    assert geometry.tile("gemm_tile_kernel<16, FcForward>") == sass.Tile(256, 256, 0)
    assert not geometry.used_missing
    assert geometry.tile("gemm_kernel<128, 64, ConvForward>") == sass.Tile(None, None, 0)
    assert geometry.used_missing


def test_tensor_core_tile_geometry():
    """mma_gemm_kernel: 256 threads, static shared memory, and per slice GEMM_TILE_K = 16
    words of k, a word one TF32 or two BF16 values: TILE_M x TILE_N x 16 (x 2) / 256
    multiply-adds per thread, from the library's tile_k."""
    geometry = sass.Geometry(os.path.join(ROOT, "libalexnet_cpu.so"))
    assert geometry.tile("mma_gemm_kernel<MmaTf32, 128, 128, ConvForward>") == sass.Tile(256, 1024, 0)
    assert geometry.tile("mma_gemm_kernel<MmaBf16, 32, 128, FcForward>") == sass.Tile(256, 512, 0)
    assert not geometry.used_missing


TINY_GEMM = r"""
struct Problem { const float *a, *b; float* c; int depth; };

template <int TILE_M, typename P>
__global__ void __launch_bounds__(256) gemm_tile_kernel(P p) {
    __shared__ float a_tile[32][64], b_tile[32][64];
    float acc[4][4] = {};
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int k0 = 0; k0 < p.depth; k0 += 32) {
        for (int i = 0; i < 8; i++) {
            a_tile[(threadIdx.x + 256 * i) / 64][threadIdx.x % 64] = p.a[k0 * 64 + threadIdx.x + 256 * i];
            b_tile[(threadIdx.x + 256 * i) / 64][threadIdx.x % 64] = p.b[k0 * 64 + threadIdx.x + 256 * i];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 32; kk++)
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a_tile[kk][ty + 16 * i] * b_tile[kk][tx + 16 * j];
        __syncthreads();
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) p.c[(ty + 16 * i) * 64 + tx + 16 * j] = acc[i][j];
}
template __global__ void gemm_tile_kernel<64, Problem>(Problem);

__global__ void scale_kernel(float* x, float s) { x[threadIdx.x] *= s; }
"""


@pytest.mark.slow
def test_report_on_a_tiny_kernel(tmp_path):
    """End to end with nvcc and the wheels' tools (make sass installs them)."""
    try:
        for tool in ("nvdisasm", "cuobjdump"):
            sass.find_tool(tool)
    except SystemExit as e:
        pytest.skip(str(e))
    if not shutil.which("nvcc"):
        pytest.skip("nvcc not found")
    source, out = tmp_path / "tiny_gemm.cu", tmp_path / "report.md"
    source.write_text(TINY_GEMM)
    assert sass.main(["--source", str(source), "--arch", "90", "--out", str(out)]) == 0
    text = out.read_text()
    assert "### sm_90: resources and occupancy on an H100" in text and "sm_80" not in text
    resources = next(line for line in text.splitlines() if line.startswith("| gemm_tile_kernel<64, Problem>"))
    cells = [c.strip() for c in resources.split("|")]
    # 16 KB of tiles + the reserved 1 KB that sm_90 counts in; threads from the launch bounds
    assert (cells[3], cells[7]) == ("17408", "256")
    assert "| scale_kernel" in text and "256*" in text
    slice_row = [line for line in text.splitlines() if line.startswith("| gemm_tile_kernel<64, Problem>")][1]
    cells = [c.strip() for c in slice_row.split("|")]
    assert cells[5] == "512"  # FFMA per slice: 4 x 4 x 32, the kk loop fully unrolled
    # 4 + 4 scalar shared loads feed 16 FFMA: 2 per load, under the target
    assert "FAIL: FFMA/shared load" in text or "FAIL: FFMA %, FFMA/shared load" in text
    assert sass.main(["--source", str(source), "--arch", "90", "--check"]) == 1


# A tensor-core slice loop (HMMA, no FFMA) whose gather divides: the k loop at 0x20-0x50 sits
# in the slice loop 0x10-0x90, which holds nvcc's inline division (I2F.U32.RP ... MUFU.RCP).
TENSOR_CORE = textwrap.dedent("""\
    \t.section\t.text._Z2tcv,"ax",@progbits
            /*0000*/                   MOV R0, RZ ;
    .L_x_0:
            /*0010*/                   I2F.U32.RP R9, R7 ;
    .L_x_1:
            /*0020*/                   LDSM.16.M88.4 R12, [R3] ;
            /*0030*/                   HMMA.1688.F32.TF32 R16, R12, R14, R16 ;
            /*0040*/                   HMMA.1688.F32.TF32 R20, R12, R15, R20 ;
            /*0050*/               @P1 BRA `(.L_x_1) ;
            /*0060*/                   MUFU.RCP R9, R9 ;
            /*0070*/                   LDG.E R4, desc[UR4][R10.64] ;
            /*0080*/                   STS [R5], R4 ;
            /*0090*/               @P0 BRA `(.L_x_0) ;
            /*00a0*/                   EXIT ;
    """)


@pytest.mark.parametrize("opcode, operands, division", [
    ("I2F.U32.RP", "R9, R7", True), ("I2F.RP", "R9, R7", True), ("I2F.U32", "R9, R7", False),
    ("I2F.F64", "R2, R7", False), ("CALL.REL.NOINC", "`($__internal_0_$__cuda_sm3x_div_u64)", True),
    ("CALL.REL.NOINC", "`($__internal_1_$__cuda_sm20_rcp_rn_f64)", False), ("MUFU.RCP", "R9, R9", False),
])
def test_integer_division_marks(opcode, operands, division):
    assert sass.is_integer_division(sass.Instr(0, opcode, operands)) == division


def kernel_with(loop, regs=128, local=0, warps=16):
    return sass.Kernel("k", sass.Resources(regs, local, 0, 0), 256, False, 0,
                       sass.Occupancy(warps // 8, warps, "registers", 100.0 * warps / 64), True, loop)


def test_tensor_core_targets_and_divisions_in_the_loops_around_the_k_loop():
    fn = sass.parse_sass(TENSOR_CORE)["_Z2tcv"]
    r = sass.reduction_loop(fn, None)  # geometry unknown: the k loop is the bulk loop
    assert r.loop == "0x20-0x50" and r.tensor_core and r.counts["HMMA"] == 2
    assert r.divisions == 1  # the I2F.RP of the slice loop around it
    assert kernel_with(r).failures() == ["integer division"]  # FFMA % and FFMA/shared load do not apply
    no_division = sass.reduction_loop(sass.parse_sass(TENSOR_CORE.replace("I2F.U32.RP", "I2F.U32"))["_Z2tcv"], None)
    assert no_division.divisions == 0 and kernel_with(no_division).failures() == []
    assert kernel_with(no_division, local=8, warps=4).failures() == ["local memory", "warps/SM"]
    # an FP32 loop keeps its FFMA targets (HEX_TARGETS: 50% FFMA, no shared loads)
    fp32 = sass.reduction_loop(sass.parse_sass(HEX_TARGETS)["_Z3hexv"], 2)
    assert not fp32.tensor_core and kernel_with(fp32).failures() == ["FFMA %"]
