#!/usr/bin/env python3
"""Static report of the compiled GPU code: what each kernel costs, read from its SASS.

`make sass` (or `.venv/bin/python dev/sass.py [--source FILE]`) compiles the CUDA source
with nvcc to one cubin per architecture (sm_90, and sm_80 unless `--arch 90`), then reads
it with cuobjdump and nvdisasm (the pip wheels nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm, which `make sass` installs into .venv; else from PATH). No GPU needed.

Table 1, every kernel: registers, static and dynamic shared memory, stack frame and local
memory per thread (non-zero: spills or arrays the compiler could not keep in
registers), and the theoretical occupancy, i.e. how many warps an SM can hold at once:
the fewest blocks allowed by registers, shared memory, warp slots and block slots. More
resident warps hide more latency. The block size is the kernel's __launch_bounds__
(EIATTR_MAX_THREADS in the cubin); without one, 256 threads are assumed (marked *).

Table 2, every matrix kernel (its name contains "gemm" and it has FFMA or HMMA): the
instructions that one thread issues per reduction slice (TILE_K steps of the reduction:
the block stages one slice of A and B in shared memory and multiplies it). Loops are
found in the SASS as backward branches (a BRA to an earlier label); the slice loop is the
innermost one that holds the bulk of the FFMA, or the loop around it when that one does
less than a slice (nvcc unrolled the loop over k only partly). Its body is counted
statically, every instruction once, both sides of a branch included. The work per slice
is known: TILE_M * TILE_N * TILE_K / threads FFMA per thread; so `slices/body` = FFMA in
the body / FFMA per slice accounts for the unrolling that nvcc did, and every count is
divided by it.
A matrix product is fast when almost everything issued is FFMA: index arithmetic,
address computation and loads must be amortised over many multiply-adds, and each
shared-memory load must feed several FFMA (register blocking).

Table 3 checks the targets on sm_90. FP32 kernels (FFMA): FFMA >= 70% of the instructions
per slice, >= 4 FFMA per shared-memory load instruction. Tensor-core kernels (HMMA in the
slice loop): HMMA's share of the instructions is not the measure there (one HMMA does 256
or 512 multiply-adds), so their targets are HMMA in the slice loop and the rest below. Both: no
integer division in the slice loop or a loop around it (nvcc's inline division starts with
I2F.RP and its 64-bit one is a CALL to a division routine), no local memory, >= 8 resident
warps per SM.

Tile geometry: the kernels gemm_kernel<TM, TN, Problem> ask libalexnet_cpu.so (ctypes)
alexnet_gemm_threads(TM, TN), alexnet_gemm_tile_k() and alexnet_gemm_shared_bytes(TM, TN)
(dynamic shared memory); the tensor-core kernels mma_gemm_kernel<MmaTf32|MmaBf16, TM, TN,
Problem> have 256 threads, static shared memory and slices of alexnet_gemm_tile_k() words,
each one TF32 or two BF16 values; the older gemm_tile_kernel<TILE_M, Problem> used 256 threads
and 64x64x32 or 16x256x16 tiles, 16 * TILE_K FFMA per thread and slice.
"""
import argparse
import ctypes
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import cached_property

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo"]  # the Makefile's NVCC_FLAGS for device code
DEFAULT_THREADS = 256  # assumed block size of a kernel without __launch_bounds__

# Targets for the matrix kernels on sm_90.
MIN_FFMA_SHARE = 70.0
MIN_FFMA_PER_SHARED_LOAD = 4.0
MIN_WARPS = 8


# ----------------------------------------------------------------------------
# Occupancy


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one GPU, as cuda_occupancy.h uses them."""
    gpu: str
    smem_per_sm: int     # the largest shared-memory carveout
    smem_per_block: int  # the most one block may use (opt-in), excluding the reserved part
    regs: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # each holds a quarter of the registers and its own warps
    max_warps: int = 64
    max_blocks: int = 32
    smem_reserved: int = 1024  # per block, by the driver (Ampere and later)
    smem_unit: int = 128


SM_LIMITS = {
    90: SMLimits("H100", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
    80: SMLimits("A100", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
}


def kernel_shared_bytes(arch: int, static: int, dynamic: int) -> int:
    """A block's shared memory without the 1 KB that the driver reserves per block. From
    sm_90 on, a kernel's static shared memory (cuobjdump's SHARED) includes that 1 KB:
    its variables start at 0x400, after the reserved window; on sm_80 they start at 0."""
    return static + dynamic - (1024 if arch >= 90 and static > 0 else 0)


def round_up(x, unit):
    return -(-x // unit) * unit


@dataclass
class Occupancy:
    blocks: int  # resident blocks per SM
    warps: int   # resident warps per SM
    limit: str   # what stops one more block: registers, shared memory, warps, blocks (ties: all)
    percent: float


def occupancy(sm: SMLimits, regs: int, threads: int, smem: int) -> Occupancy:
    """Theoretical occupancy of blocks of `threads` threads, each thread using `regs`
    registers and each block `smem` bytes of shared memory (static + dynamic, without
    the driver's reserved 1 KB, which is added here)."""
    warps_per_block = -(-threads // 32)
    regs_per_warp = round_up(max(regs, 1) * 32, sm.reg_unit)
    # a block's warps are spread over the sub-partitions, each with its share of registers
    if regs_per_warp * round_up(warps_per_block, sm.sub_partitions) > sm.regs:
        by_regs = 0
    else:
        warps_per_partition = sm.regs // sm.sub_partitions // regs_per_warp
        by_regs = warps_per_partition * sm.sub_partitions // warps_per_block
    smem_alloc = round_up(smem + sm.smem_reserved, sm.smem_unit)
    by_smem = 0 if smem_alloc > sm.smem_per_block + sm.smem_reserved else sm.smem_per_sm // smem_alloc
    limits = {"registers": by_regs, "shared memory": by_smem,
              "warps": sm.max_warps // warps_per_block, "blocks": sm.max_blocks}
    blocks = min(limits.values())
    warps = blocks * warps_per_block
    limit = ", ".join(name for name, n in limits.items() if n == blocks)
    return Occupancy(blocks, warps, limit, 100.0 * warps / sm.max_warps)


# ----------------------------------------------------------------------------
# SASS: instructions, classes, loops

INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s*(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
LABEL_RE = re.compile(r"^\s*([.$\w]+):\s*$")
SECTION_RE = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
BRANCH_TARGET_RE = re.compile(r"`\(([^)]+)\)|\b0x([0-9a-fA-F]+)\s*$")

# MMA shapes (M, N, K) by the opcode's first modifier; a warp's MMA is M*N*K
# multiply-adds, 1/32 of them per thread.
HMMA_SHAPES = {"884": (8, 8, 4), "1684": (16, 8, 4), "1688": (16, 8, 8),
               "16816": (16, 8, 16), "16832": (16, 8, 32)}

# Columns of the per-slice counts; an instruction counts in exactly one.
FMA_COLUMNS = ["FFMA", "HMMA"]
SHARED_LOADS = ["LDS", "LDS.64", "LDS.128", "LDSM"]
COLUMNS = FMA_COLUMNS + SHARED_LOADS + ["STS", "LDG", "LDGSTS", "BAR", "other"]


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str    # with modifiers: "LDS.U.128"
    operands: str  # "R8, [R2+0x10]", predicate guard removed


@dataclass
class Function:
    instrs: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # name -> address of the next instruction


def parse_sass(text: str) -> dict:
    """nvdisasm's listing -> {mangled kernel name: Function}."""
    functions, current, pending = {}, None, []
    for line in text.splitlines():
        if m := SECTION_RE.match(line):
            current, pending = functions.setdefault(m.group(1), Function()), []
        elif current is None:
            continue
        elif m := INSTR_RE.match(line):
            addr = int(m.group(1), 16)
            for label in pending:
                current.labels[label] = addr
            pending = []
            current.instrs.append(Instr(addr, m.group(2), m.group(3).strip()))
        elif m := LABEL_RE.match(line):
            pending.append(m.group(1))
    return functions


def column(opcode: str) -> str:
    """The count column of an instruction: LDS.U.128 -> LDS.128, BAR.SYNC.DEFER_BLOCKING -> BAR."""
    base, *mods = opcode.split(".")
    if base == "LDS":
        return "LDS.128" if "128" in mods else "LDS.64" if "64" in mods else "LDS"
    return base if base in COLUMNS else "other"


def macs(opcode: str) -> float:
    """Multiply-adds that one thread's instruction does: FFMA 1, HMMA.1688 16*8*8/32."""
    base, *mods = opcode.split(".")
    if base == "FFMA":
        return 1.0
    if base == "HMMA" and mods and mods[0] in HMMA_SHAPES:
        return math.prod(HMMA_SHAPES[mods[0]]) / 32
    return 0.0


def count(instrs) -> dict:
    counts = dict.fromkeys(COLUMNS, 0.0)
    for ins in instrs:
        counts[column(ins.opcode)] += 1
    return counts


def mac_sum(instrs) -> float:
    return sum(macs(i.opcode) for i in instrs)


@dataclass(eq=False)
class Loop:
    start: int   # address of the loop header (the branch target)
    end: int     # address of the last backward branch to it
    body: list   # its instructions, those of nested loops included
    parent: "Loop | None" = None
    children: list = field(default_factory=list)

    @cached_property
    def macs(self):
        return mac_sum(self.body)

    def contains(self, other):
        return self is not other and self.start <= other.start and other.end <= self.end


def branch_target(fn: Function, ins: Instr):
    """The address a BRA jumps to: a label `(.L_x_12) (nvdisasm) or 0x1a0 (cuobjdump)."""
    m = BRANCH_TARGET_RE.search(ins.operands)
    if not m:
        return None
    return fn.labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)


def find_loops(fn: Function) -> list:
    """The loops of a function as a forest: a backward branch closes a loop from its
    target to itself; branches back to the same header make one loop. Returns the
    outermost loops, each with its nested loops in `children`."""
    ends = {}
    for ins in fn.instrs:
        if ins.opcode.split(".")[0] == "BRA":
            target = branch_target(fn, ins)
            if target is not None and target < ins.addr:
                ends[target] = max(ends.get(target, 0), ins.addr)
    loops = [Loop(start, end, [i for i in fn.instrs if start <= i.addr <= end]) for start, end in ends.items()]
    for loop in loops:
        parents = [p for p in loops if p.contains(loop)]
        if parents:
            loop.parent = min(parents, key=lambda p: p.end - p.start)
            loop.parent.children.append(loop)
    return [loop for loop in loops if loop.parent is None]


@dataclass
class SliceCounts:
    """The instructions that one thread issues per slice, found in one loop."""
    loop: str        # where: "0x7940-0xf870, inner 0xf1d0-0xf830 x8"
    body_macs: float  # FFMA (HMMA: its multiply-adds) in the loop's listing
    slices: float | None  # slices per loop iteration; None: the slice size is unknown
    counts: dict     # per slice, or per loop iteration when `slices` is None
    other_loops: int  # loops nested in the slice loop, without FFMA, counted once
    inner_loops: int  # loops nested in the slice loop that do part of a slice, counted per slice
    divisions: int = 0  # integer divisions in the listing of the slice loop and the loops around it

    @property
    def tensor_core(self):
        return self.counts["HMMA"] > 0

    @property
    def total(self):
        return sum(self.counts.values())

    @property
    def fma_share(self):
        return 100.0 * sum(self.counts[c] for c in FMA_COLUMNS) / self.total

    @property
    def fma_per_shared_load(self):
        loads = sum(self.counts[c] for c in SHARED_LOADS)
        return sum(self.counts[c] for c in FMA_COLUMNS) / loads if loads else math.inf


def reduction_loop(fn: Function, slice_macs: float | None) -> SliceCounts | None:
    """Find the slice loop and count its instructions per slice.

    The innermost loop with the bulk of the FFMA: from the outermost loop with the most
    FFMA, into the nested loop with the most while it holds half of them or more. If that
    loop does less than a slice, it is the loop over k within a slice that nvcc unrolled
    only partly: the slice loop is the one around it, in which it runs slice_macs / its
    FFMA times per slice, and the rest of the slice loop (global loads, shared stores,
    barriers) once.
    """
    loops = find_loops(fn)
    if not loops or max(lp.macs for lp in loops) == 0:
        return None
    loop = max(loops, key=lambda lp: lp.macs)
    while loop.children:
        child = max(loop.children, key=lambda lp: lp.macs)
        if 2 * child.macs < loop.macs:
            break
        loop = child
    if slice_macs and loop.macs < slice_macs and loop.parent:
        loop = loop.parent

    counts, dyn_macs, where = count(loop.body), loop.macs, f"{loop.start:#x}-{loop.end:#x}"
    other_loops = inner_loops = 0
    for child in loop.children:
        if child.macs == 0:
            other_loops += 1
        elif slice_macs and child.macs < slice_macs:
            times = slice_macs / child.macs
            for col, n in count(child.body).items():
                counts[col] += (times - 1) * n
            dyn_macs += (times - 1) * child.macs
            inner_loops += 1
            where += f", inner {child.start:#x}-{child.end:#x} x{times:g}"
    slices = dyn_macs / slice_macs if slice_macs else None
    if slices:
        counts = {col: n / slices for col, n in counts.items()}
    outermost = loop  # where the geometry is unknown, `loop` may be the k loop inside the slice loop
    while outermost.parent:
        outermost = outermost.parent
    return SliceCounts(where, loop.macs, slices, counts, other_loops, inner_loops,
                       sum(map(is_integer_division, outermost.body)))


def is_integer_division(ins: Instr) -> bool:
    """The start of an integer division: nvcc's inline 32-bit division begins with a
    round-up conversion (I2F.U32.RP / I2F.RP) before its reciprocal; a 64-bit one calls a
    division routine."""
    base, *mods = ins.opcode.split(".")
    return (base == "I2F" and "RP" in mods) or (base == "CALL" and "div" in ins.operands.lower())


# ----------------------------------------------------------------------------
# cuobjdump: resources and block sizes


@dataclass
class Resources:
    regs: int
    stack: int   # stack frame bytes per thread (spills live here)
    shared: int  # static shared memory bytes per block
    local: int   # other local memory bytes per thread


def parse_res_usage(text: str) -> dict:
    """`cuobjdump -res-usage` -> {mangled name: Resources}."""
    result, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif name and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            result[name] = Resources(*map(int, m.groups()))
            name = None
    return result


def parse_max_threads(text: str) -> dict:
    """`cuobjdump -elf` -> {mangled name: threads} from EIATTR_MAX_THREADS (__launch_bounds__)
    or EIATTR_REQNTID (a required block size)."""
    result, name, attr = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\.nv\.info\.(\S+)", line):
            name = m.group(1)
        elif m := re.match(r"\s*Attribute:\s*(\S+)", line):
            attr = m.group(1)
        elif name and attr in ("EIATTR_MAX_THREADS", "EIATTR_REQNTID") and (
                m := re.match(r"\s*Value:\s*(.*)", line)):
            result[name] = math.prod(int(v, 16) for v in m.group(1).split())
            attr = None
    return result


# ----------------------------------------------------------------------------
# Names and tile geometry


def short_name(demangled: str) -> str:
    """'void gemm_kernel<128, 128, ConvForward>(ConvForward)' -> 'gemm_kernel<128, 128, ConvForward>'."""
    name = demangled.replace("(anonymous namespace)::", "")
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name.removeprefix("void ").strip()


def demangle(names) -> dict:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


@dataclass
class Tile:
    threads: int | None  # block size; None: unknown
    slice_macs: float | None  # multiply-adds per thread and slice; None: unknown
    dynamic_smem: int  # bytes per block


class Geometry:
    """Tile sizes of the matrix kernels, from their template arguments and libalexnet_cpu.so."""

    def __init__(self, lib_path: str):
        self.lib, self.missing, self.used_missing = None, None, False
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as e:
            self.missing = f"{lib_path} could not be loaded ({e})"
            return
        for fn, restype, argtypes in [("alexnet_gemm_shared_bytes", ctypes.c_size_t, [ctypes.c_int] * 2),
                                      ("alexnet_gemm_threads", ctypes.c_int, [ctypes.c_int] * 2),
                                      ("alexnet_gemm_tile_k", ctypes.c_int, [])]:
            if not hasattr(lib, fn):
                self.missing = f"{os.path.relpath(lib_path, ROOT)} has no {fn}()"
                return
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = restype, argtypes
        self.lib = lib

    def tile(self, name: str) -> Tile:
        if m := re.match(r"gemm_kernel<(\d+), (\d+),", name):
            if self.lib is None:
                self.used_missing = True
                return Tile(None, None, 0)
            tm, tn = int(m.group(1)), int(m.group(2))
            threads = self.lib.alexnet_gemm_threads(tm, tn)
            return Tile(threads, tm * tn * self.lib.alexnet_gemm_tile_k() / threads,
                        self.lib.alexnet_gemm_shared_bytes(tm, tn))
        if m := re.match(r"mma_gemm_kernel<Mma(Tf32|Bf16), (\d+), (\d+),", name):
            if self.lib is None:
                self.used_missing = True
                return Tile(None, None, 0)
            # 8 warps; a slice is GEMM_TILE_K words of one TF32 or two BF16 values; static shared memory
            per_word = 1 if m.group(1) == "Tf32" else 2
            tm, tn = int(m.group(2)), int(m.group(3))
            return Tile(256, tm * tn * self.lib.alexnet_gemm_tile_k() * per_word / 256, 0)
        if m := re.match(r"gemm_tile_kernel<(\d+),", name):  # the code before gemm_kernel
            return Tile(256, 16 * (32 if m.group(1) == "64" else 16), 0)
        return Tile(None, None, 0)


# ----------------------------------------------------------------------------
# Tools


def find_tool(name: str) -> str:
    """A CUDA tool from the pip wheels (nvidia/cu13/bin, nvidia/cuda_*/bin) in this Python's
    site-packages or the project's .venv, else from PATH."""
    venv_sites = glob.glob(os.path.join(ROOT, ".venv", "lib", "python*", "site-packages"))
    for site in [sysconfig.get_paths()["purelib"], *venv_sites]:
        for path in sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", name))):
            if os.access(path, os.X_OK):
                return path
    path = shutil.which(name)
    if not path:
        sys.exit(f"sass.py: {name} not found (make sass installs the nvidia-cuda-{name} wheel into .venv)")
    return path


def run(cmd) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"sass.py: {' '.join(cmd)} failed:\n{proc.stderr}{proc.stdout}")
    return proc.stdout


def compile_cubin(nvcc: str, source: str, arch: int) -> str:
    out_dir = os.path.join(ROOT, "build", "sass")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(source))[0]
    cubin = os.path.join(out_dir, f"{stem}.sm_{arch}.cubin")
    run([nvcc, *NVCC_FLAGS, f"-I{ROOT}", "-cubin", f"-arch=sm_{arch}", source, "-o", cubin])
    return cubin


# ----------------------------------------------------------------------------
# Report


@dataclass
class Kernel:
    name: str
    res: Resources
    threads: int
    assumed_threads: bool  # no __launch_bounds__: DEFAULT_THREADS assumed
    dynamic_smem: int
    occ: Occupancy
    is_matrix: bool  # named gemm and multiplies (FFMA or HMMA); a gemm split-sum kernel does not
    loop: SliceCounts | None  # matrix kernels only

    def failures(self) -> list:
        if self.loop is None:
            return ["no reduction loop found"]
        failed = []
        if not self.loop.tensor_core and self.loop.fma_share < MIN_FFMA_SHARE:
            failed.append("FFMA %")
        if not self.loop.tensor_core and self.loop.fma_per_shared_load < MIN_FFMA_PER_SHARED_LOAD:
            failed.append("FFMA/shared load")
        if self.loop.divisions:
            failed.append("integer division")
        if self.res.stack or self.res.local:
            failed.append("local memory")
        if self.occ.warps < MIN_WARPS:
            failed.append("warps/SM")
        return failed


def analyse(cubin: str, arch: int, geometry: Geometry) -> list:
    res = parse_res_usage(run([find_tool("cuobjdump"), "-res-usage", cubin]))
    max_threads = parse_max_threads(run([find_tool("cuobjdump"), "-elf", cubin]))
    sass = parse_sass(run([find_tool("nvdisasm"), "-c", cubin]))
    names = demangle(list(res))
    kernels = []
    for mangled, r in res.items():
        name = short_name(names[mangled])
        tile = geometry.tile(name)
        threads = max_threads.get(mangled) or tile.threads
        occ = occupancy(SM_LIMITS[arch], r.regs, threads or DEFAULT_THREADS,
                        kernel_shared_bytes(arch, r.shared, tile.dynamic_smem))
        fn = sass.get(mangled, Function())
        is_matrix = "gemm" in name and mac_sum(fn.instrs) > 0
        loop = reduction_loop(fn, tile.slice_macs) if is_matrix else None
        kernels.append(Kernel(name, r, threads or DEFAULT_THREADS, threads is None, tile.dynamic_smem, occ,
                              is_matrix, loop))
    return sorted(kernels, key=lambda k: (not k.is_matrix, k.name))


def markdown_table(headers, rows) -> str:
    """A Markdown table padded into columns; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [bool(cells) and all(re.fullmatch(r"[-\d.,%x*?]+|inf", r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda row: "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    return "\n".join([fmt(headers), rule] + [fmt(r) for r in cells])


def num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def resources_table(kernels, sm: SMLimits) -> str:
    rows = [[k.name, k.res.regs, k.res.shared, k.dynamic_smem, k.res.stack, k.res.local,
             f"{k.threads}{'*' if k.assumed_threads else ''}", k.occ.blocks, k.occ.warps,
             f"{k.occ.percent:.0f}%", k.occ.limit] for k in kernels]
    return markdown_table(["kernel", "regs", "static smem B", "dyn smem B", "stack B", "local B",
                           "threads", "blocks/SM", "warps/SM", f"occupancy ({sm.gpu})", "limited by"], rows)


def slice_table(kernels) -> str:
    loops = [k for k in kernels if k.loop]
    # columns that are zero everywhere (tensor cores, ldmatrix, cp.async) are left out
    shown = [c for c in COLUMNS if c in ("FFMA", "LDS", "LDS.64", "LDS.128", "STS", "LDG", "BAR", "other")
             or any(k.loop.counts[c] for k in loops)]
    rows = []
    for k in loops:
        lp = k.loop
        rows.append([k.name + ("" if lp.slices else " †") + (" ‡" if lp.other_loops else ""), lp.loop,
                     num(lp.body_macs), f"{lp.slices:.2f}" if lp.slices else "?",
                     *(num(lp.counts[c]) for c in shown), num(lp.total),
                     f"{lp.fma_share:.1f}", num(lp.fma_per_shared_load)])
    for k in kernels:
        if k.is_matrix and not k.loop:
            rows.append([k.name, "no loop with FFMA found", *["-"] * (len(shown) + 5)])
    return markdown_table(["kernel", "loop (SASS offsets)", "FFMA in body", "slices/body", *shown, "total",
                           "FFMA %", "FFMA/shared load"], rows)


def checks_table(kernels) -> tuple:
    rows, passed, matrix = [], 0, [k for k in kernels if k.is_matrix]
    for k in matrix:
        failed = k.failures()
        passed += not failed
        ffma = k.loop and not k.loop.tensor_core
        rows.append([k.name, f"{k.loop.fma_share:.1f}" if ffma else "-",
                     num(k.loop.fma_per_shared_load) if ffma else "-",
                     num(k.loop.counts["HMMA"]) if k.loop and k.loop.tensor_core else "-",
                     k.loop.divisions if k.loop else "-", k.res.stack + k.res.local,
                     k.occ.warps, "PASS" if not failed else "FAIL: " + ", ".join(failed)])
    table = markdown_table(["kernel", f"FFMA % (>= {MIN_FFMA_SHARE:g})",
                            f"FFMA/shared load (>= {MIN_FFMA_PER_SHARED_LOAD:g})", "HMMA/slice (> 0)",
                            "int divisions (= 0)", "local B (= 0)", f"warps/SM (>= {MIN_WARPS})", "result"], rows)
    ok = passed == len(matrix) and bool(matrix)
    summary = (f"**{'PASS' if ok else 'FAIL'}**: {passed} of {len(matrix)} matrix kernels meet the sm_90 "
               f"targets (FP32 kernels: FFMA >= {MIN_FFMA_SHARE:g}% of the instructions per slice, >= "
               f"{MIN_FFMA_PER_SHARED_LOAD:g} FFMA per shared-memory load; tensor-core kernels: HMMA in the "
               f"slice loop; all: no integer division in the slice loop, no local memory, "
               f">= {MIN_WARPS} resident warps per SM)")
    return table, summary, ok


def report(source: str, nvcc: str, archs, geometry: Geometry) -> tuple:
    version = next((ln for ln in run([nvcc, "--version"]).splitlines() if "release" in ln), "nvcc")
    out = [f"## SASS report: {os.path.relpath(source, ROOT) if source.startswith(ROOT) else source}", "",
           f"nvcc {' '.join(NVCC_FLAGS)} ({version}); counts are static, read from the listing.", ""]
    ok, notes = True, []
    for arch in archs:
        kernels = analyse(compile_cubin(nvcc, source, arch), arch, geometry)
        sm = SM_LIMITS[arch]
        out += [f"### sm_{arch}: resources and occupancy on an {sm.gpu}", "", resources_table(kernels, sm), "",
                f"### sm_{arch}: matrix kernels, instructions per thread and reduction slice", "",
                slice_table(kernels), ""]
        if arch == 90:
            table, summary, ok = checks_table(kernels)
            out += ["### sm_90: targets", "", table, "", summary, ""]
        not_matrix = sorted({k.name.split("<")[0] for k in kernels if "gemm" in k.name and not k.is_matrix})
        if not_matrix:
            notes.append(f"{', '.join(not_matrix)}: named gemm but without FFMA or HMMA, so no matrix product; "
                         "left out of the instruction counts and the targets.")
        if arch >= 90:
            notes.append("sm_90's static shared memory includes the 1 KB per block that the driver reserves "
                         "(the kernel's variables start at 0x400); occupancy counts it once.")
        if any(k.assumed_threads for k in kernels):
            notes.append(f"`*` no __launch_bounds__: {DEFAULT_THREADS} threads per block assumed.")
        if any(k.loop and not k.loop.slices for k in kernels):
            notes.append("`†` tile geometry unknown: counts per loop iteration, not per slice.")
        if any(k.loop and k.loop.inner_loops for k in kernels):
            notes.append("`inner ... xN`: nvcc unrolled the loop over k within a slice only partly; that inner "
                         "loop is counted N times per slice, the rest of the slice loop once.")
        if any(k.loop and k.loop.other_loops for k in kernels):
            notes.append("`‡` the slice loop holds other loops (without FFMA), each counted once.")
    if geometry.used_missing:
        notes.append(f"{geometry.missing}: gemm_kernel tile geometry unknown, dynamic shared memory taken as 0.")
    notes = list(dict.fromkeys(notes))
    if notes:
        out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out), ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=os.path.join(ROOT, "train_alexnet.cu"), help="CUDA file to analyse")
    ap.add_argument("--arch", nargs="+", type=int, choices=sorted(SM_LIMITS), default=[90, 80],
                    help="architectures besides sm_90, which is always analysed (default: 90 80)")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC") or shutil.which("nvcc"), help="nvcc to compile with")
    ap.add_argument("--lib", default=os.path.join(ROOT, "libalexnet_cpu.so"),
                    help="CPU build whose alexnet_gemm_* functions give the tile geometry")
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 when a matrix kernel misses a target")
    args = ap.parse_args(argv)
    if not args.nvcc:
        sys.exit("sass.py: nvcc not found (--nvcc or NVCC)")
    archs = sorted(set(args.arch) | {90}, reverse=True)
    text, ok = report(os.path.abspath(args.source), args.nvcc, archs, Geometry(os.path.abspath(args.lib)))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
