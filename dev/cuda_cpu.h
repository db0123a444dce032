/*
cuda_cpu.h: the slice of CUDA that train_alexnet.cu uses, emulated on the CPU.

train_alexnet.cu includes this header when it is not compiled by nvcc, so the very
same kernels build with g++ and run (and are tested) on machines without a GPU.

How a launch runs:
- Blocks are handed out to a persistent pool of std::threads (the launching thread
  works too). Not OpenMP: a process that forks after libgomp has run hangs its child.
- Every CUDA thread of a block is a fiber with its own stack, so __syncthreads() is a
  true barrier. Fast path: a "runner" fiber calls the kernel body for one thread after
  the other; only when a thread reaches a barrier does its runner stay parked with it,
  and a fresh runner (fresh stack) goes on with the next thread. A kernel without
  barriers therefore costs one fiber per block, not one per thread.
- The context switch is a few lines of x86-64 assembly (callee-saved registers, stack
  pointer, MXCSR and the x87 control word), about 30 ns; ucontext costs 20x more.
- Barriers are checked: threads waiting at different __syncthreads() call sites, a
  thread exiting while others wait, and deadlock become a sticky launch failure whose
  message names the kernel, block, thread and file:line (cudaGetErrorString returns it).
- Warp operations (__shfl*_sync, votes, __syncwarp) are warp-scoped barriers that
  follow the PTX rules for width, segments and out-of-range lanes.
- Tensor-core instructions (mma .tf32/.bf16, ldmatrix, cp.async, the tf32/bf16
  conversions) are emulated lane by lane with the PTX ISA's fragment layouts; mma and
  ldmatrix are warp operations too; cp.async copies land only at the wait that covers them.
- Shared memory: SHARED(T, name, dims) / EXTERN_SHARED(T, name) give all threads of a
  block the same storage from a per-worker arena that is refilled with 0xFF (NaN) at
  every block start; static shared memory is limited to 48 KB as on the GPU.
- cudaMalloc fills new memory with 0xFF bytes (NaN) and keeps a registry per device,
  so copies are checked for direction and bounds.

Environment (read at every launch):
  CUDA_CPU_SCHEDULE=forward|reverse|random  order of threads in a block and of blocks
  CUDA_CPU_SEED=n                           seed of the random order (default 0)
  CUDA_CPU_WORKERS=n                        worker threads (default: all cores)
  CUDA_CPU_DEVICES=n                        emulated devices (default 2)
  CUDA_CPU_FASTPATH=0                       one fiber per thread from the start
  CUDA_CPU_DEFERRED=1                       queued stream work runs only at sync points
*/
#pragma once
#if !defined(__x86_64__)
#error "dev/cuda_cpu.h: the fiber switch is written for x86-64"
#endif

#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <setjmp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_CPU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define CUDA_CPU_ASAN 0
#endif

// ----------------------------------------------------------------------------
// Qualifiers and built-in types

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __CUDA_CPU__ 1

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

#define CUDA_CPU_VEC2(T, N) \
    struct __attribute__((aligned(2 * sizeof(T)))) N##2 { T x, y; }; \
    static inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define CUDA_CPU_VEC4(T, N) \
    struct __attribute__((aligned(4 * sizeof(T)))) N##4 { T x, y, z, w; }; \
    static inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
CUDA_CPU_VEC2(float, float) CUDA_CPU_VEC4(float, float)
CUDA_CPU_VEC2(int, int) CUDA_CPU_VEC4(int, int)
CUDA_CPU_VEC2(unsigned int, uint) CUDA_CPU_VEC4(unsigned int, uint)
CUDA_CPU_VEC4(unsigned char, uchar)
#undef CUDA_CPU_VEC2
#undef CUDA_CPU_VEC4

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorPeerAccessAlreadyEnabled = 704,
    cudaErrorPeerAccessNotEnabled = 705,
    cudaErrorMisalignedAddress = 716,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801,
    cudaErrorUnknown = 999,
};
typedef cudaError_t cudaError;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// The device attributes the runtime answers (CUDA's own numbering).
enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMaxThreadsPerMultiProcessor = 39,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
    cudaDevAttrMaxRegistersPerMultiprocessor = 82,
};

#define cudaStreamDefault 0x0u
#define cudaStreamNonBlocking 0x1u
#define cudaEventDefault 0x0u
#define cudaEventBlockingSync 0x1u
#define cudaEventDisableTiming 0x2u
#define cudaHostAllocDefault 0x0u
#define cudaHostAllocPortable 0x1u

struct CUstream_st;
struct CUevent_st;
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    int regsPerBlock;
    int warpSize;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    int multiProcessorCount;
    int major;
    int minor;
};

// ----------------------------------------------------------------------------
// The runtime's state. Everything has internal linkage, so two libraries built with
// this header and loaded into one process keep separate runtimes.

namespace cuda_cpu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxDevices = 16;
constexpr size_t kStaticSharedLimit = 48 * 1024;
// Under ASan, poisoned gaps between shared arrays catch an overrun into the next one.
constexpr size_t kSharedRedzone = CUDA_CPU_ASAN ? 64 : 0;
constexpr size_t kSharedArena = CUDA_CPU_ASAN ? 2 * kStaticSharedLimit : kStaticSharedLimit;
constexpr size_t kDynamicSharedOptinLimit = 227 * 1024;
constexpr size_t kParamLimit = 4096;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kStackGuard = 64 * 1024;  // wider than any sane frame, so no frame jumps over it

// The device that attributes and occupancy describe: an H100 SXM, so that code which
// sizes its launches from the device makes the same choices here as on the GPU.
constexpr int kSmCount = 132;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxBlocksPerSm = 32;
constexpr size_t kSharedPerSm = 228 * 1024;
constexpr size_t kSharedReservedPerBlock = 1024;
constexpr int kRegistersPerSm = 65536;
// A kernel's register count is not known here: occupancy assumes 128 per thread, the
// most that __launch_bounds__(256, 2) allows.
constexpr int kAssumedRegistersPerThread = 128;

// --- fiber switch --------------------------------------------------------------
// cuda_cpu_switch(save, to): pushes the callee-saved registers, MXCSR and the x87
// control word, stores the stack pointer in *save, loads `to` and pops the same
// frame from there. A new fiber's first frame returns into cuda_cpu_fiber_start,
// which calls r13(r12). The symbols are local to this object file.
extern "C" void cuda_cpu_switch(void** save, void* to);
extern "C" void cuda_cpu_fiber_start();
asm(R"(
    .pushsection .text
    .p2align 4
    .type cuda_cpu_switch, @function
cuda_cpu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw (%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_cpu_switch, .-cuda_cpu_switch
    .p2align 4
    .type cuda_cpu_fiber_start, @function
cuda_cpu_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size cuda_cpu_fiber_start, .-cuda_cpu_fiber_start
    .popsection
)");

// Builds the first frame of a fiber at the top of [base, base+size): switching to
// the returned stack pointer calls fn(arg) on that stack.
static void* fiber_frame(char* base, size_t size, void (*fn)(intptr_t), intptr_t arg) {
    uintptr_t top = ((uintptr_t)(base + size) - 64) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = (uint64_t)(uintptr_t)&cuda_cpu_fiber_start;  // return address of the switch
    *--sp = 0;                                             // rbp
    *--sp = 0;                                             // rbx
    *--sp = (uint64_t)arg;                                 // r12
    *--sp = (uint64_t)(uintptr_t)fn;                       // r13
    *--sp = 0;                                             // r14
    *--sp = 0;                                             // r15
    sp -= 2;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    memcpy((char*)sp + 8, &mxcsr, 4);
    memcpy((char*)sp, &fpucw, 2);
    return sp;
}

// --- environment ------------------------------------------------------------------
enum Schedule { kForward, kReverse, kRandom };

// A value the runtime cannot use is said once per variable, then the default applies.
static void env_warn(const char* name, const char* value, const char* expected) {
    static std::mutex mu;
    static std::vector<std::string>* warned = new std::vector<std::string>;
    std::lock_guard<std::mutex> lock(mu);
    if (std::find(warned->begin(), warned->end(), name) != warned->end()) return;
    warned->push_back(name);
    fprintf(stderr, "cuda_cpu: ignoring %s=%s (expected %s)\n", name, value, expected);
}

static long env_long(const char* name, long fallback) {
    const char* v = getenv(name);
    if (!v || !*v) return fallback;
    char* end;
    long x = strtol(v, &end, 10);
    if (*end) {
        env_warn(name, v, "an integer");
        return fallback;
    }
    return x;
}

static Schedule env_schedule() {
    const char* v = getenv("CUDA_CPU_SCHEDULE");
    if (!v || !*v || !strcmp(v, "forward")) return kForward;
    if (!strcmp(v, "reverse")) return kReverse;
    if (!strcmp(v, "random")) return kRandom;
    env_warn("CUDA_CPU_SCHEDULE", v, "forward, reverse or random");
    return kForward;
}

static int device_count() {
    long n = env_long("CUDA_CPU_DEVICES", 2);
    return (int)std::max(0L, std::min(n, (long)kMaxDevices));
}

// splitmix64: seeds the random schedules.
static inline uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static void shuffle(int* v, int n, uint64_t seed) {
    for (int i = n - 1; i > 0; i--) {
        seed = mix64(seed);
        int j = (int)(seed % (uint64_t)(i + 1));
        std::swap(v[i], v[j]);
    }
}

// --- errors -------------------------------------------------------------------------
struct State {
    std::mutex mu;
    cudaError_t sticky[kMaxDevices] = {};
    std::map<int, std::string> detail;  // latest detailed message per error code
};
static State& state() {
    static State* s = new State;  // never destroyed: pool threads may outlive statics
    return *s;
}

static thread_local cudaError_t tls_last_error = cudaSuccess;
static thread_local int tls_device = 0;

static const char* error_name(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorPeerAccessAlreadyEnabled: return "peer access is already enabled";
    case cudaErrorPeerAccessNotEnabled: return "peer access has not been enabled";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
    }
}

// Records an error with a detailed message; returns the error for `return set_error(...)`.
__attribute__((format(printf, 2, 3)))
static cudaError_t set_error(cudaError_t e, const char* fmt, ...) {
    char msg[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(msg, sizeof(msg), fmt, args);
    va_end(args);
    {
        std::lock_guard<std::mutex> lock(state().mu);
        state().detail[(int)e] = std::string(error_name(e)) + ": " + msg;
    }
    tls_last_error = e;
    return e;
}

static cudaError_t set_sticky(int device, cudaError_t e, const std::string& msg) {
    {
        std::lock_guard<std::mutex> lock(state().mu);
        state().detail[(int)e] = std::string(error_name(e)) + ": " + msg;
        if (state().sticky[device] == cudaSuccess) state().sticky[device] = e;
    }
    tls_last_error = e;
    return e;
}

static cudaError_t sticky_error(int device) {
    std::lock_guard<std::mutex> lock(state().mu);
    return state().sticky[device];
}

// Checks the current device; returns its sticky error, if any.
static cudaError_t api_enter() {
    if (tls_device >= device_count()) return set_error(cudaErrorNoDevice, "no emulated device (CUDA_CPU_DEVICES=%d)", device_count());
    cudaError_t e = sticky_error(tls_device);
    if (e != cudaSuccess) tls_last_error = e;
    return e;
}

// --- memory registry -------------------------------------------------------------------
struct Allocation {
    size_t size;
    int device;  // -1: pinned host memory
};

struct Registry {
    std::mutex mu;
    std::map<uintptr_t, Allocation> blocks;
    bool peer[kMaxDevices][kMaxDevices] = {};
};
static Registry& registry() {
    static Registry* r = new Registry;
    return *r;
}

// Finds the allocation holding p: its base and record; base 0 when p is plain host memory.
static uintptr_t find_allocation(const void* p, Allocation* out) {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.blocks.upper_bound((uintptr_t)p);
    if (it == r.blocks.begin()) return 0;
    --it;
    if ((uintptr_t)p >= it->first + std::max<size_t>(it->second.size, 1)) return 0;
    *out = it->second;
    return it->first;
}

// --- per-worker block execution --------------------------------------------------------
enum ThreadState : uint8_t { kUnstarted, kRunning, kWaitBlock, kWaitWarp, kReady, kExited };
enum WarpOp : uint8_t { kSyncWarp, kBallot, kAny, kAll, kShflIdx, kShflUp, kShflDown, kShflXor,
                        kMmaTf32, kMmaBf16, kLdmatrix, kLdmatrixTrans };  // the matrix operations last
static const char* const kWarpOpNames[] = {"__syncwarp", "__ballot_sync", "__any_sync", "__all_sync",
                                           "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                           "mma_m16n8k8_tf32", "mma_m16n8k16_bf16", "ldmatrix", "ldmatrix .trans"};

struct ThreadSlot {
    void* sp;            // saved stack pointer of the fiber hosting this thread while it waits
    int stack;           // index of that fiber's stack
    ThreadState state;
    WarpOp op;
    const char* file;    // where it waits
    int line;
    uint32_t mask;
    int32_t param;
    int32_t width;
    uint64_t value;
    uint64_t result;
    uint32_t async_groups;  // cp.async groups this thread has committed
};

// A cp.async copy that no wait has covered yet.
struct AsyncCopy {
    int thread;
    uint32_t group;  // the thread's group count when the copy was made: the group it will belong to
    char* dst;
    const char* src;
};

struct KernelCall {
    void (*run)(const void* args);
    std::shared_ptr<void> args;
    const char* name;
};

struct Stack {
    char* base;  // usable memory, above the guard region
    size_t size;
};

struct SharedSlot {
    const void* key;
    size_t offset;
};

struct Worker {
    // the block being run
    const KernelCall* call = nullptr;
    dim3 block_dim;
    uint3 block_idx;
    int n = 0;               // threads in the block
    int next_unstarted = 0;  // index into order
    int live = 0;            // threads that have not exited
    int waiting = 0;         // threads waiting at __syncthreads()
    int first_exited = -1;
    const char* bar_file = nullptr;
    int bar_line = 0;
    int bar_thread = -1;
    int cur = -1;            // thread now running
    bool fast_path = true;
    Schedule schedule = kForward;
    uint64_t seed = 0;
    uint64_t epoch = 0;
    std::vector<ThreadSlot> t = std::vector<ThreadSlot>(kMaxThreads);
    std::vector<int> order = std::vector<int>(kMaxThreads);
    std::vector<int> ready = std::vector<int>(kMaxThreads);
    uint32_t ready_head = 0, ready_tail = 0;
    int bar_count[2] = {0, 0};  // __syncthreads_count of the current and the previous barrier
    int bar_phase = 0;
    uint32_t warp_waiting[kMaxThreads / 32] = {};
    bool warp_mixed[kMaxThreads / 32] = {};  // the lanes waiting may be at different operations or masks
    uint32_t warp_exited[kMaxThreads / 32] = {};
    std::vector<AsyncCopy> async_copies;
    // failure of the block
    bool failed = false;
    cudaError_t error = cudaSuccess;
    std::string message;
    // fibers
    void* main_sp = nullptr;
    std::vector<Stack> stacks;
    std::vector<int> free_stacks;
    int dead_stack = -1;
    // shared memory
    char* smem = nullptr;         // static arena, kSharedArena bytes
    size_t smem_used = 0;         // arena bytes the block's SHARED arrays occupy
    size_t smem_declared = 0;     // what the block's SHARED arrays take on a GPU
    std::vector<SharedSlot> smem_slots;
    std::unique_ptr<char, decltype(&free)> dyn_storage{nullptr, &free};  // dynamic shared memory, exactly the launch's size
    size_t dyn_capacity = 0;
    char* dyn_smem = nullptr;
    // memory faults inside kernels
    sigjmp_buf fault_jump;
    bool fault_handler_ready = false;
    volatile bool fault_armed = false;
    int fault_signal = 0;
    void* fault_address = nullptr;
#if CUDA_CPU_ASAN
    const void* main_stack_bottom = nullptr;
    size_t main_stack_size = 0;
#endif
    Worker() {
        smem = (char*)aligned_alloc(128, kSharedArena);
        memset(smem, 0xFF, kSharedArena);
    }
};

// Current worker and the built-in variables of the running CUDA thread.
static __thread Worker* tls_worker __attribute__((tls_model("initial-exec")));
static __thread uint3 tls_thread_idx __attribute__((tls_model("initial-exec")));
static __thread uint3 tls_block_idx __attribute__((tls_model("initial-exec")));
static __thread dim3 tls_block_dim __attribute__((tls_model("initial-exec")));
static __thread dim3 tls_grid_dim __attribute__((tls_model("initial-exec")));

static std::string thread_name(const Worker& w, int t) {
    unsigned bx = w.block_dim.x, by = w.block_dim.y;
    char buf[160];
    snprintf(buf, sizeof(buf), "thread (%u,%u,%u) of block (%u,%u,%u)", t % bx, (t / bx) % by, t / (bx * by),
             w.block_idx.x, w.block_idx.y, w.block_idx.z);
    return buf;
}

static void set_current(Worker& w, int t) {
    w.cur = t;
    unsigned bx = w.block_dim.x, by = w.block_dim.y;
    if (bx == (unsigned)w.n) tls_thread_idx = uint3{(unsigned)t, 0, 0};  // 1-D blocks: no division
    else tls_thread_idx = uint3{t % bx, (t / bx) % by, t / (bx * by)};
}

// ASan must be told when the stack changes under it.
static inline void fiber_switch(Worker& w, void** save, void* to, const Stack* to_stack, bool dying) {
#if CUDA_CPU_ASAN
    void* fake = nullptr;
    if (to_stack) __sanitizer_start_switch_fiber(dying ? nullptr : &fake, to_stack->base, to_stack->size);
    else __sanitizer_start_switch_fiber(dying ? nullptr : &fake, w.main_stack_bottom, w.main_stack_size);
    cuda_cpu_switch(save, to);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    (void)w; (void)to_stack; (void)dying;
    cuda_cpu_switch(save, to);
#endif
}

static int take_stack(Worker& w) {
    if (!w.free_stacks.empty()) {
        int s = w.free_stacks.back();
        w.free_stacks.pop_back();
        return s;
    }
    char* p = (char*)mmap(nullptr, kStackGuard + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return -1;
    mprotect(p, kStackGuard, PROT_NONE);  // a stack overflow faults instead of corrupting
    w.stacks.push_back(Stack{p + kStackGuard, kStackBytes});
    return (int)w.stacks.size() - 1;
}

// A block-level failure: the block stops, the launch reports it as a sticky error.
static void block_fail(Worker& w, cudaError_t e, const std::string& msg) {
    if (w.failed) return;
    w.failed = true;
    w.error = e;
    w.message = msg;
}

static void runner_main(intptr_t stack);

// Leaves the current fiber (or the worker's own stack when save == &w.main_sp) for the
// next thing to run: a released thread, else a new runner for the next unstarted thread,
// else the worker's main loop. Returns when the caller is resumed; false when nothing
// else could run (only from the main loop).
static bool switch_next(Worker& w, void** save, bool from_main) {
    if (!w.failed) {
        if (w.ready_head != w.ready_tail) {
            int t = w.ready[w.ready_head++ % kMaxThreads];
            ThreadSlot& s = w.t[t];
            s.state = kRunning;
            set_current(w, t);
            if (&s.sp != save) fiber_switch(w, save, s.sp, &w.stacks[s.stack], false);
            return true;
        }
        if (w.next_unstarted < w.n) {
            int st = take_stack(w);
            if (st < 0) {
                block_fail(w, cudaErrorLaunchOutOfResources, "cannot map a fiber stack");
            } else {
                Stack& stack = w.stacks[st];
#if CUDA_CPU_ASAN
                // the frames that never returned (runner_main and the switch into the main
                // loop) sit at the top; a failed block unpoisons whole stacks (end_block)
                __asan_unpoison_memory_region(stack.base + stack.size - 16384, 16384);
#endif
                // Stacks are 256 KB apart, so their tops would all fall into the same cache
                // sets; shifting each top by a few cache lines spreads the hot frames out.
                size_t color = (size_t)(st % 128) * 576;
                void* sp = fiber_frame(stack.base, stack.size - color, runner_main, st);
                fiber_switch(w, save, sp, &stack, false);
                return true;
            }
        }
    }
    if (from_main) return false;
    fiber_switch(w, save, w.main_sp, nullptr, false);
    return true;
}

// Called in a fiber when its thread cannot go on: the worker's main loop takes over for good.
[[noreturn]] static void fiber_abandon(Worker& w) {
    void* dummy;
    fiber_switch(w, &dummy, w.main_sp, nullptr, true);
    __builtin_unreachable();
}

// The running thread misused something: the block stops with `e`; the message starts with
// the thread's name.
[[noreturn]] static void kernel_fail(Worker& w, cudaError_t e, const std::string& what) {
    block_fail(w, e, thread_name(w, w.cur) + what);
    fiber_abandon(w);
}

static void thread_exit(Worker& w, int t) {
    ThreadSlot& s = w.t[t];
    s.state = kExited;
    w.live--;
    if (w.first_exited < 0) w.first_exited = t;
    if (w.waiting > 0) {
        block_fail(w, cudaErrorLaunchFailure,
                   thread_name(w, t) + " exited while " + thread_name(w, w.bar_thread) + " waits at __syncthreads() " +
                       w.bar_file + ":" + std::to_string(w.bar_line));
        return;
    }
    int warp = t >> 5, lane = t & 31;
    w.warp_exited[warp] |= 1u << lane;
    for (uint32_t m = w.warp_waiting[warp]; m; m &= m - 1) {
        int other = warp * 32 + __builtin_ctz(m);
        const ThreadSlot& o = w.t[other];
        if (o.mask >> lane & 1u) {
            block_fail(w, cudaErrorLaunchFailure,
                       thread_name(w, t) + " exited while " + thread_name(w, other) + " waits for it at " +
                           kWarpOpNames[o.op] + " " + o.file + ":" + std::to_string(o.line));
            return;
        }
    }
}

static void runner_main(intptr_t stack) {
    Worker& w = *tls_worker;
#if CUDA_CPU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    while (!w.failed && w.next_unstarted < w.n) {
        int t = w.order[w.next_unstarted++];
        ThreadSlot& s = w.t[t];
        s.stack = (int)stack;
        s.state = kRunning;
        set_current(w, t);
        w.call->run(w.call->args.get());
        thread_exit(w, t);
        if (!w.fast_path) break;
    }
    w.dead_stack = (int)stack;
    fiber_abandon(w);
}

// Appends threads to the ready queue in schedule order.
static void make_ready(Worker& w, int t) {
    w.t[t].state = kReady;
    w.ready[w.ready_tail++ % kMaxThreads] = t;  // a ring: a thread is in it at most once
}

// __syncthreads(); returns how many threads passed a non-zero predicate (for
// __syncthreads_count/_and/_or). The count of a barrier lives in one of two slots, so
// it stays readable until everyone has left it.
static int syncthreads(const char* file, int line, int predicate = 0) {
    Worker* wp = tls_worker;
    if (!wp || wp->cur < 0) return 0;  // host code: nothing to wait for
    Worker& w = *wp;
    int t = w.cur;
    ThreadSlot& s = w.t[t];
    if (w.first_exited >= 0) {
        block_fail(w, cudaErrorLaunchFailure,
                   thread_name(w, t) + " waits at __syncthreads() " + file + ":" + std::to_string(line) + " but " +
                       thread_name(w, w.first_exited) + " has exited");
        fiber_abandon(w);
    }
    if (w.waiting == 0) {
        w.bar_file = file;
        w.bar_line = line;
        w.bar_thread = t;
    } else if (w.bar_line != line || (w.bar_file != file && strcmp(w.bar_file, file) != 0)) {
        block_fail(w, cudaErrorLaunchFailure,
                   "divergent __syncthreads(): " + thread_name(w, t) + " waits at " + file + ":" + std::to_string(line) +
                       ", " + thread_name(w, w.bar_thread) + " at " + w.bar_file + ":" + std::to_string(w.bar_line));
        fiber_abandon(w);
    }
    s.state = kWaitBlock;
    s.file = file;
    s.line = line;
    int phase = w.bar_phase;
    w.bar_count[phase] += predicate != 0;
    if (++w.waiting == w.live) {  // everyone has arrived: release in schedule order
        w.waiting = 0;
        w.bar_phase ^= 1;
        w.bar_count[w.bar_phase] = 0;
        if (w.schedule == kRandom) shuffle(w.order.data(), w.n, w.seed ^ mix64(++w.epoch));
        for (int i = 0; i < w.n; i++)
            if (w.t[w.order[i]].state == kWaitBlock) make_ready(w, w.order[i]);
    }
    switch_next(w, &s.sp, false);
    if (w.failed) fiber_abandon(w);
    return w.bar_count[phase];
}

// Result of a warp operation for one lane, by the PTX rules (shfl.sync: the source
// lane j and whether it is valid; out-of-segment sources return the lane's own value).
static uint64_t warp_result(const Worker& w, int warp, int lane, uint32_t members, uint32_t existing) {
    const ThreadSlot& s = w.t[warp * 32 + lane];
    uint32_t ballot = 0;
    switch (s.op) {
    case kSyncWarp: return 0;
    case kBallot: case kAny: case kAll:
        for (uint32_t m = members; m; m &= m - 1) {
            int l = __builtin_ctz(m);
            if (w.t[warp * 32 + l].value) ballot |= 1u << l;
        }
        if (s.op == kBallot) return ballot;
        if (s.op == kAny) return ballot != 0;
        return ballot == members;
    default: break;
    }
    uint32_t seg = (uint32_t)(32 - s.width);       // segment mask: the lane bits above the width
    uint32_t min_lane = (uint32_t)lane & seg;
    uint32_t max_lane = min_lane | (31u & ~seg);
    int64_t j;
    bool valid;
    switch (s.op) {
    case kShflIdx: j = min_lane | ((uint32_t)s.param & 31u & ~seg); valid = true; break;
    case kShflUp: j = (int64_t)lane - (uint32_t)s.param; valid = j >= (int64_t)min_lane; break;
    case kShflDown: j = (int64_t)lane + (uint32_t)s.param; valid = j <= (int64_t)max_lane; break;
    default: j = (int64_t)((uint32_t)lane ^ (uint32_t)s.param); valid = j <= (int64_t)max_lane; break;
    }
    if (!valid) return s.value;
    if (!((existing & members) >> j & 1u)) return ~(uint64_t)0;  // inactive source lane: undefined -> NaN bits
    return w.t[warp * 32 + (int)j].value;
}

// --- tensor-core instructions, the warp-wide part ------------------------------------------
// mma and ldmatrix are warp operations like the shuffles, but a lane hands over several
// registers and gets several back, so ThreadSlot::value carries a pointer to its operands.
// The lanes that arrived first stay parked on their own stacks, so the lane that arrives
// last reads and writes every lane's registers through these pointers.
struct MmaLane {
    const unsigned* a;
    const unsigned* b;
    const float* c;
    float* d;
};
struct LdmatrixLane {
    const char* row;  // lanes 8i..8i+7 give the addresses of the 8 rows of matrix i
    unsigned* r;
};

template <typename T>
static T& lane_operands(const Worker& w, int warp, int lane) {
    return *reinterpret_cast<T*>((uintptr_t)w.t[warp * 32 + lane].value);
}

static float float_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

// A .tf32 operand as the tensor cores read it. The PTX ISA leaves the tf32 layout to the
// implementation (">= 10 bits" of mantissa); the hardware reads the sign, the exponent and
// the top 10 mantissa bits of the register and ignores the low 13 ("only the first 10 bits
// of the input mantissa are read", PyTorch's notes on numerical accuracy), so an operand
// that skipped cvt.rna is truncated, not rounded.
static float tf32_operand(uint32_t bits) { return float_from_bits(bits & 0xFFFFE000u); }
static float bf16_operand(uint32_t bits16) { return float_from_bits(bits16 << 16); }

// D = A B + C, one m16n8k8 .tf32 product (per = 1 element per register) or one m16n8k16
// .bf16 product (per = 2, the lower column or row in the low half). The fragments follow
// the PTX ISA ("Matrix Fragments for mma.m16n8k8", "... for mma.m16n8k16 with floating
// point type"); with g = lane / 4 and t = lane % 4:
//   A register i (0-3):  row g + 8 (i & 1),   k = per t + 4 per (i >> 1) (+ 1 for the high half)
//   B register j (0-1):  k = per t + 4 per j (+ 1),   column g
//   C and D element i:   row g + 8 (i >> 1),  column 2t + (i & 1)
// Arithmetic: a tf32 or bf16 product has at most 22 significant bits, so it is exact in
// FP32 (outside FP32's normal range it is rounded as an FP32 multiply is). The sum runs in
// FP32 in a fixed order, every addition rounded to nearest even: d = c, then d += a[k] b[k]
// for k = 0, 1, ..., K-1. The order and rounding inside the tensor cores are not
// specified; this order is the runtime's own, so its results are reproducible and a test
// can compute them.
static void warp_mma(const Worker& w, int warp, int per) {
    const int K = 8 * per;
    float a[16][16], b[16][8], c[16][8];
    auto element = [per](unsigned reg, int half) {
        return per == 1 ? tf32_operand(reg) : bf16_operand(reg >> (16 * half) & 0xFFFFu);
    };
    for (int lane = 0; lane < 32; lane++) {
        const MmaLane& x = lane_operands<MmaLane>(w, warp, lane);
        int g = lane >> 2, t = lane & 3;
        for (int h = 0; h < per; h++) {
            for (int i = 0; i < 4; i++) a[g + 8 * (i & 1)][per * t + 4 * per * (i >> 1) + h] = element(x.a[i], h);
            for (int j = 0; j < 2; j++) b[per * t + 4 * per * j + h][g] = element(x.b[j], h);
        }
        for (int i = 0; i < 4; i++) c[g + 8 * (i >> 1)][2 * t + (i & 1)] = x.c[i];
    }
    // Each output adds its products to c in k order. k is the outer loop, so that the 128
    // sums advance together (the compiler vectorises them) instead of one long chain each.
    // Every lane's operands are read before any d is written: d may be the lane's own c.
    for (int k = 0; k < K; k++)
        for (int row = 0; row < 16; row++)
            for (int col = 0; col < 8; col++) c[row][col] += a[row][k] * b[k][col];
    for (int lane = 0; lane < 32; lane++) {
        int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 4; i++) lane_operands<MmaLane>(w, warp, lane).d[i] = c[g + 8 * (i >> 1)][2 * t + (i & 1)];
    }
}

// ldmatrix.m8n8.b16 of `count` 8x8 matrices of 16-bit values (PTX ISA, ldmatrix): lane l
// receives in register i the elements (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1) of
// matrix i, the lower column in the low half; .trans reads the matrix transposed (rows
// 2 (l % 4) and 2 (l % 4) + 1 of column l / 4).
static void warp_ldmatrix(const Worker& w, int warp, int count, bool trans) {
    auto element = [&](int matrix, int row, int col) {
        uint16_t v;
        memcpy(&v, lane_operands<LdmatrixLane>(w, warp, 8 * matrix + row).row + 2 * col, sizeof(v));
        return (uint32_t)v;
    };
    for (int lane = 0; lane < 32; lane++) {
        int row = lane >> 2, col = 2 * (lane & 3);
        for (int i = 0; i < count; i++) {
            uint32_t lo = trans ? element(i, col, row) : element(i, row, col);
            uint32_t hi = trans ? element(i, col + 1, row) : element(i, row, col + 1);
            lane_operands<LdmatrixLane>(w, warp, lane).r[i] = lo | hi << 16;
        }
    }
}

static uint64_t warp_op(WarpOp op, uint32_t mask, uint64_t value, int32_t param, int32_t width, const char* file, int line) {
    Worker* wp = tls_worker;
    if (!wp || wp->cur < 0) {
        fprintf(stderr, "cuda_cpu: %s called outside a kernel\n", kWarpOpNames[op]);
        return value;
    }
    Worker& w = *wp;
    int t = w.cur, warp = t >> 5, lane = t & 31;
    ThreadSlot& s = w.t[t];
    auto where = [&] { return std::string(" at ") + kWarpOpNames[op] + " " + file + ":" + std::to_string(line); };
    if (op >= kShflIdx && op <= kShflXor && (width < 1 || width > 32 || (width & (width - 1))))
        kernel_fail(w, cudaErrorLaunchFailure, where() + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
    if (!(mask >> lane & 1u)) kernel_fail(w, cudaErrorLaunchFailure, where() + ": its own lane is not in the mask");
    int lanes = std::min(32, w.n - warp * 32);
    uint32_t existing = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
    uint32_t members = mask & existing;
    if (op >= kMmaTf32 && existing != 0xFFFFFFFFu)
        kernel_fail(w, cudaErrorLaunchFailure, where() + ": the instruction needs all 32 lanes of a warp, and this warp has " +
                                                   std::to_string(lanes) + " threads");
    if (members & w.warp_exited[warp]) {
        int other = warp * 32 + __builtin_ctz(members & w.warp_exited[warp]);
        kernel_fail(w, cudaErrorLaunchFailure, where() + " waits for " + thread_name(w, other) + ", which has exited");
    }
    // every waiting lane that this one names, or that names this one, must do the same;
    // when all of them wait at this operation with this mask (the usual case: checked on one
    // of them, see warp_mixed) there is nothing to compare
    const uint32_t waiting = w.warp_waiting[warp];
    const ThreadSlot& some = w.t[warp * 32 + (waiting ? __builtin_ctz(waiting) : 0)];
    const bool same = !waiting || (!w.warp_mixed[warp] && some.op == op && some.mask == mask);
    w.warp_mixed[warp] |= !same;
    for (uint32_t m = same ? 0 : waiting; m; m &= m - 1) {
        const ThreadSlot& o = w.t[warp * 32 + __builtin_ctz(m)];
        bool related = (members >> __builtin_ctz(m) & 1u) || (o.mask >> lane & 1u);
        if (related && (o.mask != mask || o.op != op)) {
            char buf[64];
            snprintf(buf, sizeof(buf), " (mask 0x%08x vs 0x%08x)", mask, o.mask);
            block_fail(w, cudaErrorLaunchFailure, "mismatched warp operation: " + thread_name(w, t) + where() + buf + ", " +
                           thread_name(w, warp * 32 + __builtin_ctz(m)) + " at " + kWarpOpNames[o.op] + " " + o.file + ":" + std::to_string(o.line));
            fiber_abandon(w);
        }
    }
    s.state = kWaitWarp;
    s.op = op;
    s.mask = mask;
    s.value = value;
    s.param = param;
    s.width = width;
    s.file = file;
    s.line = line;
    w.warp_waiting[warp] |= 1u << lane;
    if ((w.warp_waiting[warp] & members) == members) {  // all lanes arrived: compute, then release
        if (op == kMmaTf32 || op == kMmaBf16) {
            warp_mma(w, warp, op == kMmaTf32 ? 1 : 2);
        } else if (op == kLdmatrix || op == kLdmatrixTrans) {
            warp_ldmatrix(w, warp, param, op == kLdmatrixTrans);
        } else {
            for (uint32_t m = members; m; m &= m - 1) {
                int l = __builtin_ctz(m);
                w.t[warp * 32 + l].result = warp_result(w, warp, l, members, existing);
            }
        }
        w.warp_waiting[warp] &= ~members;
        if (!w.warp_waiting[warp]) w.warp_mixed[warp] = false;
        int first = w.schedule == kReverse ? 31 : 0, step = w.schedule == kReverse ? -1 : 1;
        int rot = w.schedule == kRandom ? (int)(mix64(w.seed ^ ++w.epoch) & 31) : 0;
        for (int i = 0; i < 32; i++) {
            int l = (first + step * i + rot) & 31;
            if (members >> l & 1u) make_ready(w, warp * 32 + l);
        }
    }
    switch_next(w, &s.sp, false);
    if (w.failed) fiber_abandon(w);
    return s.result;
}

// The worker running the calling CUDA thread; what only a kernel can do aborts elsewhere.
static Worker& kernel_worker(const char* what) {
    Worker* w = tls_worker;
    if (!w || w->cur < 0) {
        fprintf(stderr, "cuda_cpu: %s used outside a kernel\n", what);
        abort();
    }
    return *w;
}

// Static shared memory: one slot per declaration (keyed by a static token), allocated
// by the first thread of the block that reaches it.
static void* shared_static(const void* key, size_t bytes, size_t align) {
    Worker& w = kernel_worker("SHARED");
    for (const SharedSlot& s : w.smem_slots)
        if (s.key == key) return w.smem + s.offset;
    size_t declared = ((w.smem_declared + align - 1) & ~(align - 1)) + bytes;
    size_t offset = (w.smem_used + kSharedRedzone + align - 1) & ~(align - 1);
    if (declared > kStaticSharedLimit || offset + bytes > kSharedArena) {
        block_fail(w, cudaErrorLaunchOutOfResources,
                   "static shared memory of kernel " + std::string(w.call->name) + " exceeds 48 KB (" +
                       std::to_string(declared) + " bytes)");
        fiber_abandon(w);
    }
    w.smem_slots.push_back(SharedSlot{key, offset});
    w.smem_used = offset + bytes;
    w.smem_declared = declared;
#if CUDA_CPU_ASAN
    __asan_unpoison_memory_region(w.smem + offset, bytes);
#endif
    return w.smem + offset;
}

static void* shared_dynamic() {
    Worker* wp = tls_worker;
    return wp ? wp->dyn_smem : nullptr;
}

// Instructions that take shared-memory addresses: `bytes` at p must lie in the block's
// shared arrays (static or dynamic) and p must be aligned to `align` bytes, else the
// kernel fails as it would on the GPU.
// where(): the operation and the caller's position, for the message (built only on failure:
// the warp matrix operations check every lane's address).
template <typename Where>
static void check_shared_address(Worker& w, const void* p, size_t bytes, size_t align, Where&& where) {
    const char* q = (const char*)p;
    auto inside = [q, bytes](const char* base, size_t size) { return base && q >= base && q + bytes <= base + size; };
    auto address = [p] {
        char text[32];
        snprintf(text, sizeof(text), "%p", p);
        return std::string(text);
    };
    if (!inside(w.smem, w.smem_used) && !inside(w.dyn_smem, w.dyn_capacity))
        kernel_fail(w, cudaErrorIllegalAddress, where() + ": address " + address() + " is not in shared memory");
    if ((uintptr_t)p % align)
        kernel_fail(w, cudaErrorMisalignedAddress, where() + ": address " + address() + " is not " + std::to_string(align) + "-byte aligned");
}

// --- a launch: blocks over the worker pool --------------------------------------------
struct Grid {
    KernelCall call;
    dim3 grid, block;
    size_t smem;
    uint64_t blocks;
    Schedule schedule;
    uint64_t seed;
    bool fast_path;
    int device;
    uint64_t order_mul = 1, order_add = 0;  // random schedule: block (mul * i + add) mod blocks
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    cudaError_t error = cudaSuccess;
    std::string message;
};

static Worker& this_worker() {
    if (!tls_worker) {
        tls_worker = new Worker;  // one per OS thread, kept for reuse
#if CUDA_CPU_ASAN
        pthread_attr_t attr;
        void* addr = nullptr;
        pthread_getattr_np(pthread_self(), &attr);
        pthread_attr_getstack(&attr, &addr, &tls_worker->main_stack_size);
        pthread_attr_destroy(&attr);
        tls_worker->main_stack_bottom = addr;
#endif
    }
    return *tls_worker;
}

// After a block: on failure, the abandoned fibers' stacks are all free again and the
// launch records the first failure.
static void end_block(Worker& w, Grid& g) {
    if (w.failed) {
        w.free_stacks.clear();
        for (int i = (int)w.stacks.size() - 1; i >= 0; i--) {
            w.free_stacks.push_back(i);
#if CUDA_CPU_ASAN
            __asan_unpoison_memory_region(w.stacks[i].base, w.stacks[i].size);
#endif
        }
        std::lock_guard<std::mutex> lock(g.mu);
        if (!g.failed.exchange(true)) {
            g.error = w.error;
            g.message = "kernel " + std::string(g.call.name) + ": " + w.message;
        }
    }
    w.cur = -1;
    w.call = nullptr;
}

static void run_block(Worker& w, Grid& g, uint64_t b) {
    w.call = &g.call;
    w.block_dim = g.block;
    w.block_idx = uint3{(unsigned)(b % g.grid.x), (unsigned)(b / g.grid.x % g.grid.y), (unsigned)(b / ((uint64_t)g.grid.x * g.grid.y))};
    w.n = (int)(g.block.x * g.block.y * g.block.z);
    w.next_unstarted = 0;
    w.live = w.n;
    w.waiting = 0;
    w.first_exited = -1;
    w.cur = -1;
    w.fast_path = g.fast_path;
    w.schedule = g.schedule;
    w.seed = mix64(g.seed ^ mix64(b + 1));
    w.epoch = 0;
    w.ready_head = w.ready_tail = 0;
    w.bar_count[0] = w.bar_count[1] = 0;
    w.bar_phase = 0;
    w.failed = false;
    w.dead_stack = -1;
    int nwarps = (w.n + 31) / 32;
    for (int i = 0; i < nwarps; i++) w.warp_waiting[i] = w.warp_exited[i] = 0, w.warp_mixed[i] = false;
    for (int i = 0; i < w.n; i++) {
        w.order[i] = g.schedule == kReverse ? w.n - 1 - i : i;
        w.t[i].state = kUnstarted;
        w.t[i].async_groups = 0;
    }
    w.async_copies.clear();  // copies the block before never waited for: they never land
    if (g.schedule == kRandom) shuffle(w.order.data(), w.n, w.seed);
    // shared memory: back to NaN bytes (the block before used [0, smem_used) of the arena)
#if CUDA_CPU_ASAN
    __asan_unpoison_memory_region(w.smem, kSharedArena);
#endif
    memset(w.smem, 0xFF, w.smem_used);
#if CUDA_CPU_ASAN
    __asan_poison_memory_region(w.smem, kSharedArena);
#endif
    w.smem_used = 0;
    w.smem_declared = 0;
    w.smem_slots.clear();
    if (g.smem) {
        if (w.dyn_capacity != g.smem) {  // exactly the launch's size, so ASan sees overruns
            void* p = nullptr;
            w.dyn_capacity = posix_memalign(&p, 128, g.smem) == 0 ? g.smem : 0;
            w.dyn_storage.reset((char*)p);
            if (!w.dyn_capacity) {
                block_fail(w, cudaErrorLaunchOutOfResources, "cannot allocate " + std::to_string(g.smem) + " bytes of dynamic shared memory");
                end_block(w, g);
                return;
            }
        }
        memset(w.dyn_storage.get(), 0xFF, g.smem);
        w.dyn_smem = w.dyn_storage.get();
    } else {
        w.dyn_smem = nullptr;
    }
    tls_block_idx = w.block_idx;
    tls_block_dim = g.block;
    tls_grid_dim = g.grid;

    while (true) {
        if (w.dead_stack >= 0) {
            w.free_stacks.push_back(w.dead_stack);
            w.dead_stack = -1;
        }
        if (w.failed) break;
        if (!switch_next(w, &w.main_sp, true)) {
            if (w.live > 0) {
                // nothing can run: name a thread at a block barrier and one at a warp operation
                std::string msg = "deadlock:";
                for (int i = 0; i < w.n; i++) {
                    const ThreadSlot& s = w.t[i];
                    if (s.state == kWaitBlock) { msg += " " + thread_name(w, i) + " waits at __syncthreads() " + s.file + ":" + std::to_string(s.line) + ";"; break; }
                }
                for (int i = 0; i < w.n; i++) {
                    const ThreadSlot& s = w.t[i];
                    if (s.state == kWaitWarp) { msg += " " + thread_name(w, i) + " waits at " + kWarpOpNames[s.op] + " " + s.file + ":" + std::to_string(s.line) + ";"; break; }
                }
                msg.pop_back();
                block_fail(w, cudaErrorLaunchFailure, msg);
            }
            break;
        }
    }
    end_block(w, g);
}

// A memory fault inside a kernel (outside ASan, which reports faults itself) jumps back
// to the worker's run_blocks, and the launch fails with cudaErrorIllegalAddress instead
// of killing the process. Faults elsewhere go to the handler that was there before.
static struct sigaction previous_action[32];

static void fault_handler(int sig, siginfo_t* info, void* context) {
    Worker* w = tls_worker;
    if (w && w->fault_armed && w->cur >= 0) {
        w->fault_armed = false;
        w->fault_signal = sig;
        w->fault_address = info->si_addr;
        siglongjmp(w->fault_jump, 1);
    }
    const struct sigaction& old = previous_action[sig];
    if (old.sa_flags & SA_SIGINFO) {
        old.sa_sigaction(sig, info, context);
    } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
        old.sa_handler(sig);
    } else {
        sigaction(sig, &old, nullptr);  // the fault repeats with the default action
    }
}

static void install_fault_handler(Worker& w) {
#if !CUDA_CPU_ASAN
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = fault_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) sigaction(sig, &sa, &previous_action[sig]);
    });
    stack_t current;
    if (sigaltstack(nullptr, &current) == 0 && (current.ss_flags & SS_DISABLE)) {  // keep one the host set up
        stack_t alt;
        alt.ss_size = 64 * 1024;
        alt.ss_sp = malloc(alt.ss_size);
        alt.ss_flags = 0;
        sigaltstack(&alt, nullptr);
    }
#endif
    w.fault_handler_ready = true;
}

static std::string fault_message(const Worker& w) {
    char buf[256];
    uintptr_t a = (uintptr_t)w.fault_address;
    for (const Stack& st : w.stacks)
        if (a >= (uintptr_t)st.base - kStackGuard && a < (uintptr_t)st.base)
            return thread_name(w, w.cur) + ": stack overflow (a CUDA thread's stack is 256 KB here)";
    const char* what = w.fault_signal == SIGFPE ? "arithmetic exception" : w.fault_signal == SIGILL ? "illegal instruction" : "invalid memory access";
    snprintf(buf, sizeof(buf), ": %s at address %p", what, w.fault_address);
    return thread_name(w, w.cur) + buf;
}

static void run_blocks(Grid& g) {
    Worker& w = this_worker();
    if (!w.fault_handler_ready) install_fault_handler(w);
    if (sigsetjmp(w.fault_jump, 1)) {
        bool memory = w.fault_signal == SIGSEGV || w.fault_signal == SIGBUS;
        block_fail(w, memory ? cudaErrorIllegalAddress : cudaErrorLaunchFailure, fault_message(w));
        end_block(w, g);
        return;
    }
    w.fault_armed = true;
    while (!g.failed.load(std::memory_order_relaxed)) {
        uint64_t i = g.next.fetch_add(1);
        if (i >= g.blocks) break;
        uint64_t b = g.schedule == kForward   ? i
                     : g.schedule == kReverse ? g.blocks - 1 - i
                                              : (uint64_t)(((__uint128_t)g.order_mul * i + g.order_add) % g.blocks);
        run_block(w, g, b);
    }
    w.fault_armed = false;
}

// Persistent worker threads; the launching thread works too. Helpers that wake up late
// (a busy machine) find the grid closed and go back to sleep: the launcher only waits
// for helpers that are running blocks. Never destroyed (the threads are detached and
// may still wait when static destructors run).
struct Pool {
    std::mutex launch_mu;  // one grid at a time
    std::mutex mu;
    std::condition_variable wake, done;
    int threads = 0;
    uint64_t generation = 0;
    int wanted = 0;     // pool threads asked to help with the current grid
    int active = 0;     // pool threads running its blocks
    bool open = false;  // helpers may still join it
    Grid* grid = nullptr;
};
static Pool& pool() {
    static Pool* p = [] {
        Pool* q = new Pool;
        pthread_atfork([] { pool().launch_mu.lock(); },
                       [] { pool().launch_mu.unlock(); },
                       [] {  // the child has no pool threads: start over
                           new (&pool().launch_mu) std::mutex;
                           new (&pool().mu) std::mutex;
                           new (&pool().wake) std::condition_variable;
                           new (&pool().done) std::condition_variable;
                           pool().threads = 0;
                           pool().active = 0;
                           pool().open = false;
                       });
        return q;
    }();
    return *p;
}

static void pool_thread(int index, uint64_t seen) {
    Pool& p = pool();
    std::unique_lock<std::mutex> lock(p.mu);
    for (;;) {
        p.wake.wait(lock, [&] { return p.generation != seen && index < p.wanted; });
        seen = p.generation;
        if (!p.open) continue;
        p.active++;
        Grid* g = p.grid;
        lock.unlock();
        run_blocks(*g);
        lock.lock();
        if (--p.active == 0) p.done.notify_all();
    }
}

static void run_grid(Grid& g) {
    Pool& p = pool();
    std::lock_guard<std::mutex> launch(p.launch_mu);
    long workers = env_long("CUDA_CPU_WORKERS", (long)std::max(1u, std::thread::hardware_concurrency()));
    int helpers = (int)std::min<uint64_t>((uint64_t)std::max(1L, std::min(workers, 256L)), g.blocks) - 1;
    if (helpers > 0) {
        std::unique_lock<std::mutex> lock(p.mu);
        while (p.threads < helpers) std::thread(pool_thread, p.threads++, p.generation).detach();
        p.grid = &g;
        p.wanted = helpers;
        p.open = true;
        p.generation++;
        p.wake.notify_all();
    }
    run_blocks(g);
    if (helpers > 0) {
        std::unique_lock<std::mutex> lock(p.mu);
        p.open = false;
        p.done.wait(lock, [&] { return p.active == 0; });
        p.wanted = 0;
    }
}

// --- streams and events -----------------------------------------------------------------
// Work on a stream runs in order. Normally it runs at once (the host waits for it); with
// CUDA_CPU_DEFERRED=1 it is queued and runs only when the host synchronises (stream,
// event or device synchronisation, synchronous copies, cudaFree), as late as CUDA allows,
// so a missing synchronisation shows up as stale data. Each queued op carries the
// points (stream, sequence number) it must wait for: the legacy default stream waits for
// the blocking streams of its device and they wait for it, cudaStreamWaitEvent waits for
// the event's recorded point.
}  // namespace
}  // namespace cuda_cpu

struct CUstream_st;
namespace cuda_cpu {
struct StreamOp {  // a type only: no symbol of its own, so no anonymous namespace needed
    std::function<void()> run;
    std::vector<std::pair<CUstream_st*, uint64_t>> after;
};
}  // namespace cuda_cpu

struct CUstream_st {
    int device;
    unsigned flags;
    bool destroyed = false;
    uint64_t enqueued = 0;  // ops ever queued
    uint64_t done = 0;      // ops ever run
    std::deque<cuda_cpu::StreamOp> queue;
};
struct CUevent_st {
    int device;
    unsigned flags;
    CUstream_st* stream = nullptr;  // where it was last recorded (null: never)
    uint64_t seq = 0;               // complete once stream->done >= seq
    std::chrono::steady_clock::time_point time;
};

namespace cuda_cpu {
namespace {

struct Streams {
    std::recursive_mutex mu;
    std::vector<CUstream_st*> all;  // live streams; destroyed ones stay allocated, as events may point at them
    uint64_t pending = 0;           // queued ops of all streams
    CUstream_st legacy[kMaxDevices];
    Streams() {
        for (int i = 0; i < kMaxDevices; i++) {
            legacy[i].device = i;
            legacy[i].flags = 0;
            all.push_back(&legacy[i]);
        }
    }
};
static Streams& streams() {
    static Streams* s = new Streams;
    return *s;
}

static CUstream_st* resolve(cudaStream_t s) { return s ? s : &streams().legacy[tls_device]; }
static bool deferred() { return env_long("CUDA_CPU_DEFERRED", 0) != 0; }

// Runs the queued work of s up to sequence number seq (and whatever that waits for).
static void run_until(CUstream_st* s, uint64_t seq) {
    while (s->done < seq && !s->queue.empty()) {
        StreamOp op = std::move(s->queue.front());
        s->queue.pop_front();
        for (auto& dep : op.after) run_until(dep.first, dep.second);
        op.run();
        s->done++;
        streams().pending--;
    }
}

static void run_all(int device) {  // device < 0: every device
    Streams& st = streams();
    std::lock_guard<std::recursive_mutex> lock(st.mu);
    if (!st.pending) return;
    for (CUstream_st* s : st.all)
        if (device < 0 || s->device == device) run_until(s, s->enqueued);
}

// Queues (deferred mode) or runs one piece of work on stream s.
static void stream_run(CUstream_st* s, std::function<void()> op, std::vector<std::pair<CUstream_st*, uint64_t>> after = {}) {
    Streams& st = streams();
    std::lock_guard<std::recursive_mutex> lock(st.mu);
    if (!deferred()) {
        run_all(-1);  // the mode may have just changed: older queued work first
        op();
        s->enqueued++;
        s->done++;
        return;
    }
    if (s == &st.legacy[s->device]) {
        for (CUstream_st* b : st.all)
            if (b != s && b->device == s->device && !(b->flags & cudaStreamNonBlocking)) after.push_back({b, b->enqueued});
    } else if (!(s->flags & cudaStreamNonBlocking)) {
        CUstream_st* legacy = &st.legacy[s->device];
        after.push_back({legacy, legacy->enqueued});
    }
    s->queue.push_back(StreamOp{std::move(op), std::move(after)});
    s->enqueued++;
    st.pending++;
}

static void stream_sync(CUstream_st* s) {
    std::lock_guard<std::recursive_mutex> lock(streams().mu);
    run_until(s, s->enqueued);
}

// Dynamic shared memory above 48 KB needs an opt-in per kernel, as on the GPU.
static std::map<const void*, size_t>& shared_optin() {
    static auto* m = new std::map<const void*, size_t>;
    return *m;
}
static std::mutex shared_optin_mu;
static size_t dynamic_shared_limit(const void* kernel) {
    std::lock_guard<std::mutex> lock(shared_optin_mu);
    auto it = shared_optin().find(kernel);
    return it == shared_optin().end() ? kStaticSharedLimit : std::max(kStaticSharedLimit, it->second);
}

static uint64_t launch_counter() {
    static std::atomic<uint64_t> n{0};
    return n++;
}

static void launch_grid(std::shared_ptr<Grid> g) {
    if (sticky_error(g->device) != cudaSuccess) return;
    g->schedule = env_schedule();
    g->seed = mix64((uint64_t)env_long("CUDA_CPU_SEED", 0) ^ mix64(launch_counter()));
    g->fast_path = env_long("CUDA_CPU_FASTPATH", 1) != 0;
    if (g->schedule == kRandom) {  // a permutation of the blocks without a table: a multiplier coprime to their count
        uint64_t r = g->seed;
        do {
            r = mix64(r);
            g->order_mul = r % g->blocks;
        } while (std::gcd(g->order_mul, g->blocks) != 1);
        g->order_add = mix64(r) % g->blocks;
    }
    run_grid(*g);
    if (g->failed) set_sticky(g->device, g->error, g->message);
}

// A kernel can only dereference device memory of its own device, of a peer whose access
// was enabled, or pinned host memory. Pointer arguments are checked at launch (a pointer
// one past the end of an allocation is fine; null too).
template <typename T>
static void check_pointer_argument(const T& v, int index, int device, std::string& bad) {
    if constexpr (std::is_pointer<T>::value && !std::is_function<std::remove_pointer_t<T>>::value) {
        if (v == nullptr || !bad.empty()) return;
        Allocation a{};
        const char* p = (const char*)v;
        if (!find_allocation(p, &a) && !find_allocation(p - 1, &a)) {
            char buf[160];
            snprintf(buf, sizeof(buf), "argument %d (%p) is not memory from cudaMalloc or cudaMallocHost", index + 1, (const void*)p);
            bad = buf;
        } else if (a.device >= 0 && a.device != device) {
            std::lock_guard<std::mutex> lock(registry().mu);
            if (!registry().peer[device][a.device]) {
                char buf[200];
                snprintf(buf, sizeof(buf), "argument %d points to memory of device %d, and device %d has no peer access to it (cudaDeviceEnablePeerAccess)",
                         index + 1, a.device, device);
                bad = buf;
            }
        }
    }
}

template <typename... P>
struct KernelArgs {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
    static void run(const void* p) {
        const KernelArgs* a = (const KernelArgs*)p;
        std::apply(a->kernel, a->args);
    }
};

template <typename... P, typename... A>
static void launch(const char* name, const char* file, int line, void (*kernel)(P...), dim3 grid, dim3 block,
                   size_t smem, cudaStream_t stream, A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "KERNEL_LAUNCH: wrong number of kernel arguments");
    if (api_enter() != cudaSuccess) return;
    CUstream_st* s = resolve(stream);
    auto where = [&] { return std::string(name) + " at " + file + ":" + std::to_string(line); };
    uint64_t threads = (uint64_t)block.x * block.y * block.z;
    uint64_t blocks = (uint64_t)grid.x * grid.y * grid.z;
    if (s->device != tls_device) {
        set_error(cudaErrorInvalidResourceHandle, "kernel %s launched on a stream of device %d while device %d is current", where().c_str(), s->device, tls_device);
        return;
    }
    if (threads == 0 || blocks == 0 || threads > kMaxThreads || block.z > 64 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7FFFFFFFu) {
        set_error(cudaErrorInvalidConfiguration, "kernel %s: grid (%u,%u,%u), block (%u,%u,%u): at most 1024 threads per block, block.z <= 64, grid.x < 2^31, grid.y and grid.z <= 65535, none zero",
                  where().c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return;
    }
    size_t smem_limit = dynamic_shared_limit((const void*)kernel);
    if (smem > smem_limit) {
        set_error(cudaErrorInvalidValue, "kernel %s: %zu bytes of dynamic shared memory (limit %zu%s)", where().c_str(), smem, smem_limit,
                  smem_limit < kDynamicSharedOptinLimit ? "; cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n) raises it" : "");
        return;
    }
    size_t param_bytes = 0;
    for (size_t b : {(size_t)0, sizeof(std::decay_t<P>)...}) param_bytes += (b + 7) & ~(size_t)7;
    if (param_bytes > kParamLimit) {
        set_error(cudaErrorInvalidValue, "kernel %s: %zu bytes of parameters (limit %zu)", where().c_str(), param_bytes, kParamLimit);
        return;
    }
    auto g = std::make_shared<Grid>();
    auto a = std::make_shared<KernelArgs<P...>>(KernelArgs<P...>{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)});
    g->call = KernelCall{&KernelArgs<P...>::run, a, name};
    g->grid = grid;
    g->block = block;
    g->smem = smem;
    g->blocks = blocks;
    g->device = tls_device;
    std::string bad;
    std::apply([&](const auto&... v) {
        int index = 0;
        (check_pointer_argument(v, index++, tls_device, bad), ...);
    }, a->args);
    if (!bad.empty()) {  // the GPU would fault on it: a sticky illegal address
        set_sticky(tls_device, cudaErrorIllegalAddress, "kernel " + where() + ": " + bad);
        return;
    }
    stream_run(s, [g] { launch_grid(g); });
}

}  // namespace
}  // namespace cuda_cpu

// ----------------------------------------------------------------------------
// What kernels see

#define threadIdx (::cuda_cpu::tls_thread_idx)
#define blockIdx (::cuda_cpu::tls_block_idx)
#define blockDim (::cuda_cpu::tls_block_dim)
#define gridDim (::cuda_cpu::tls_grid_dim)
static constexpr int warpSize = 32;

#define __syncthreads() ((void)::cuda_cpu::syncthreads(__FILE__, __LINE__))
#define __syncthreads_count(pred) ::cuda_cpu::syncthreads(__FILE__, __LINE__, (pred))
#define __syncthreads_and(pred) (::cuda_cpu::syncthreads(__FILE__, __LINE__, !(pred)) == 0)
#define __syncthreads_or(pred) (::cuda_cpu::syncthreads(__FILE__, __LINE__, (pred)) != 0)
#define SHARED(T, name, dims)                                                              \
    static const char cuda_cpu_smem_key_##name = 0;                                        \
    T(&name) dims = *reinterpret_cast<T(*) dims>(                                          \
        ::cuda_cpu::shared_static(&cuda_cpu_smem_key_##name, sizeof(T dims), alignof(T)))
#define EXTERN_SHARED(T, name) T* name = reinterpret_cast<T*>(::cuda_cpu::shared_dynamic())
#define KERNEL_LAUNCH(kernel, grid, block, smem, stream, ...) \
    ::cuda_cpu::launch(#kernel, __FILE__, __LINE__, kernel, dim3(grid), dim3(block), (size_t)(smem), (stream) __VA_OPT__(,) __VA_ARGS__)

// Warp operations: a warp-scoped barrier over the lanes in `mask`.
namespace cuda_cpu {
namespace {
template <typename T>
static T shfl(WarpOp op, unsigned mask, T var, int param, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffle of a type wider than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    uint64_t r = warp_op(op, mask, bits, param, width, file, line);
    T out;
    memcpy(&out, &r, sizeof(T));
    return out;
}
}  // namespace
}  // namespace cuda_cpu
#define __shfl_sync(mask, var, lane, ...) ::cuda_cpu::shfl(::cuda_cpu::kShflIdx, (mask), (var), (lane), CUDA_CPU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, var, delta, ...) ::cuda_cpu::shfl(::cuda_cpu::kShflUp, (mask), (var), (int)(delta), CUDA_CPU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, delta, ...) ::cuda_cpu::shfl(::cuda_cpu::kShflDown, (mask), (var), (int)(delta), CUDA_CPU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) ::cuda_cpu::shfl(::cuda_cpu::kShflXor, (mask), (var), (lane_mask), CUDA_CPU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define CUDA_CPU_WIDTH(...) ::cuda_cpu::width_or_32(__VA_ARGS__)
#define __ballot_sync(mask, pred) ((unsigned)::cuda_cpu::warp_op(::cuda_cpu::kBallot, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, pred) ((int)::cuda_cpu::warp_op(::cuda_cpu::kAny, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, pred) ((int)::cuda_cpu::warp_op(::cuda_cpu::kAll, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __syncwarp(...) ((void)::cuda_cpu::warp_op(::cuda_cpu::kSyncWarp, ::cuda_cpu::mask_or_full(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))
namespace cuda_cpu {
namespace {
static inline int width_or_32() { return 32; }
static inline int width_or_32(int w) { return w; }
static inline unsigned mask_or_full() { return 0xFFFFFFFFu; }
static inline unsigned mask_or_full(unsigned m) { return m; }
}  // namespace
}  // namespace cuda_cpu

// __trap(): the kernel stops with a launch failure, as on the GPU.
static inline void __trap() {
    ::cuda_cpu::Worker* w = ::cuda_cpu::tls_worker;
    if (!w || w->cur < 0) abort();
    ::cuda_cpu::kernel_fail(*w, cudaErrorLaunchFailure, " called __trap()");
}

static inline unsigned __activemask() {
    ::cuda_cpu::Worker* w = ::cuda_cpu::tls_worker;
    if (!w || w->cur < 0) return 0xFFFFFFFFu;
    int lanes = std::min(32, w->n - (w->cur & ~31));
    return lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
}

// ----------------------------------------------------------------------------
// Device functions: atomics, memory fences, math intrinsics

template <typename T>
static inline T cuda_cpu_atomic_add_float(T* p, T v) {
    T old, sum;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
        sum = old + v;
    } while (!__atomic_compare_exchange(p, &old, &sum, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
}
static inline float atomicAdd(float* p, float v) { return cuda_cpu_atomic_add_float(p, v); }
static inline double atomicAdd(double* p, double v) { return cuda_cpu_atomic_add_float(p, v); }
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicMax(int* p, int v) { int old = *p; while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {} return old; }
static inline int atomicMin(int* p, int v) { int old = *p; while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {} return old; }
static inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline float atomicExch(float* p, float v) { float old; __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST); return old; }
static inline int atomicCAS(int* p, int cmp, int v) { __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return cmp; }
static inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) { __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return cmp; }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
template <typename T> static inline T __ldg(const T* p) { return *p; }

// glibc declares some of these names itself, hence macros.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __powf(x, y) powf((x), (y))
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
static inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
static inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
    return (x >> 16) | (x << 16);
}
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) { return (unsigned long long)(((__uint128_t)a * b) >> 64); }
#define CUDA_CPU_MINMAX(T)                                              \
    static inline T min(T a, T b) { return b < a ? b : a; }           \
    static inline T max(T a, T b) { return a < b ? b : a; }
CUDA_CPU_MINMAX(int)
CUDA_CPU_MINMAX(unsigned)
CUDA_CPU_MINMAX(long)
CUDA_CPU_MINMAX(unsigned long)
CUDA_CPU_MINMAX(long long)
CUDA_CPU_MINMAX(unsigned long long)
#undef CUDA_CPU_MINMAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

// ----------------------------------------------------------------------------
// Tensor-core instructions (sm_80 and later), emulated lane by lane
//
// Each function stands for one PTX instruction; dev/tensor_core_ptx.cuh defines the same
// functions as inline PTX for the GPU build. Every lane holds exactly the fragment
// elements the PTX ISA gives it, so a kernel that puts an element in the wrong register
// gets a wrong result here as on the GPU. mma and ldmatrix are warp operations: a lane
// waits until all 32 lanes of its warp have arrived, and a partial warp, a lane that
// exited or lanes at different operations are reported. `file` and `line` default to the
// caller's position, for those reports.

namespace cuda_cpu {
namespace {

static void mma(WarpOp op, float* d, const unsigned* a, const unsigned* b, const float* c, const char* file, int line) {
    MmaLane operands{a, b, c, d};
    warp_op(op, 0xFFFFFFFFu, (uintptr_t)&operands, 0, 32, file, line);
}

static void ldmatrix(WarpOp op, int count, unsigned* r, const void* row, const char* file, int line) {
    Worker* w = tls_worker;
    if (w && w->cur >= 0 && (w->cur & 31) < 8 * count)  // the lanes whose address is used
        check_shared_address(*w, row, 16, 16, [&] { return std::string(" at ") + kWarpOpNames[op] + " " + file + ":" + std::to_string(line); });
    LdmatrixLane operands{(const char*)row, r};
    warp_op(op, 0xFFFFFFFFu, (uintptr_t)&operands, count, 32, file, line);
}

// float -> bf16, round to nearest even; NaN becomes the canonical bf16 NaN 0x7FFF, as in
// the CUDA toolkit's own host conversion (cuda_bf16.hpp).
static uint32_t bf16_rn(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;
    return (bits + 0x7FFFu + (bits >> 16 & 1u)) >> 16;  // below half: down; above: up; a tie: to the even one
}

// cp.async: the copy is deferred until a wait covers its group (the PTX ISA makes the
// writes visible to the copying thread only after cp.async.wait_group on their group or
// cp.async.wait_all), and the destination holds NaN bytes from the call until then, so
// a kernel that reads it too early sees the poison. The source is read at the wait too.
static void async_copy(void* dst, const void* src, const char* file, int line) {
    Worker& w = kernel_worker("cp_async_16");
    auto where = [&] { return std::string(" at cp_async_16 ") + file + ":" + std::to_string(line); };
    check_shared_address(w, dst, 16, 16, where);
    if ((uintptr_t)src % 16) kernel_fail(w, cudaErrorMisalignedAddress, where() + ": the source is not 16-byte aligned");
    memset(dst, 0xFF, 16);
    w.async_copies.push_back(AsyncCopy{w.cur, w.t[w.cur].async_groups, (char*)dst, (const char*)src});
}

// cp.async.commit_group: the thread's uncommitted copies become its next group (an empty
// group if there are none).
static void async_commit() {
    Worker& w = kernel_worker("cp_async_commit");
    w.t[w.cur].async_groups++;
}

// cp.async.wait_group `pending`: every group of the calling thread but its `pending` most
// recent ones completes; copies not yet committed stay pending.
static void async_wait(uint32_t pending) {
    Worker& w = kernel_worker("cp_async_wait");
    uint32_t groups = w.t[w.cur].async_groups;
    size_t kept = 0;
    for (size_t i = 0; i < w.async_copies.size(); i++) {
        const AsyncCopy c = w.async_copies[i];
        if (c.thread == w.cur && c.group + pending < groups) memcpy(c.dst, c.src, 16);
        else w.async_copies[kept++] = c;
    }
    w.async_copies.resize(kept);
}

}  // namespace
}  // namespace cuda_cpu

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d = a b + c over the warp (layout
// and arithmetic: cuda_cpu::warp_mma).
static inline void mma_m16n8k8_tf32(float d[4], const unsigned a[4], const unsigned b[2], const float c[4],
                                    const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::mma(::cuda_cpu::kMmaTf32, d, a, b, c, file, line);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: each register holds two bf16
// values, the lower column (A) or row (B) in the low half.
static inline void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4],
                                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::mma(::cuda_cpu::kMmaBf16, d, a, b, c, file, line);
}

// ldmatrix.sync.aligned.m8n8.x2/.x4{.trans}.shared.b16: lanes 8i..8i+7 pass the (16-byte
// aligned) shared-memory addresses of the rows of matrix i; the rows need not be
// contiguous. Layout: cuda_cpu::warp_ldmatrix.
static inline void ldmatrix_x2(unsigned r[2], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::ldmatrix(::cuda_cpu::kLdmatrix, 2, r, row, file, line);
}
static inline void ldmatrix_x2_trans(unsigned r[2], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::ldmatrix(::cuda_cpu::kLdmatrixTrans, 2, r, row, file, line);
}
static inline void ldmatrix_x4(unsigned r[4], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::ldmatrix(::cuda_cpu::kLdmatrix, 4, r, row, file, line);
}
static inline void ldmatrix_x4_trans(unsigned r[4], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::ldmatrix(::cuda_cpu::kLdmatrixTrans, 4, r, row, file, line);
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero (PTX ISA, cvt), to a float
// whose low 13 bits are zero. Exactly what ptxas 13.0 compiles it to for sm_80 and sm_90
// (read with cuobjdump -sass): a finite input gets half a tf32 unit added to its bits, the
// carry running into the exponent (so the largest floats become infinity), then the low
// 13 bits are cleared; infinities and NaNs are only cleared, so a NaN whose payload lies
// only in the low 13 bits becomes an infinity.
static inline unsigned cvt_rna_tf32(float x) {
    unsigned bits = __float_as_uint(x);
    if ((bits & 0x7FFFFFFFu) < 0x7F800000u) bits += 0x1000u;
    return bits & 0xFFFFE000u;
}

// cvt.rn.bf16x2.f32: two floats rounded to nearest even to bf16 and packed, `lo` in the
// low half. (The PTX instruction puts its first source in the upper half, so the GPU
// version passes hi first.)
static inline unsigned pack_bf16x2(float lo, float hi) {
    return ::cuda_cpu::bf16_rn(lo) | ::cuda_cpu::bf16_rn(hi) << 16;
}

// cp.async.cg.shared.global of 16 bytes (both addresses 16-byte aligned), commit_group,
// wait_group N and wait_all; the emulation: cuda_cpu::async_copy.
static inline void cp_async_16(void* shared_dst, const void* global_src, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
    ::cuda_cpu::async_copy(shared_dst, global_src, file, line);
}
static inline void cp_async_commit() { ::cuda_cpu::async_commit(); }
template <int N>
static inline void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a count of groups");
    ::cuda_cpu::async_wait(N);
}
static inline void cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait<0>();
}

// ----------------------------------------------------------------------------
// Runtime API

static inline cudaError_t cudaGetLastError() {
    cudaError_t e = ::cuda_cpu::tls_last_error;
    cudaError_t sticky = ::cuda_cpu::tls_device < ::cuda_cpu::kMaxDevices ? ::cuda_cpu::sticky_error(::cuda_cpu::tls_device) : cudaSuccess;
    ::cuda_cpu::tls_last_error = sticky;
    return e != cudaSuccess ? e : sticky;
}
static inline cudaError_t cudaPeekAtLastError() {
    cudaError_t e = ::cuda_cpu::tls_last_error;
    return e != cudaSuccess ? e : ::cuda_cpu::sticky_error(::cuda_cpu::tls_device);
}
static inline const char* cudaGetErrorString(cudaError_t e) {
    auto& s = ::cuda_cpu::state();
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.detail.find((int)e);
    return it != s.detail.end() ? it->second.c_str() : ::cuda_cpu::error_name(e);
}
static inline const char* cudaGetErrorName(cudaError_t e) { return ::cuda_cpu::error_name(e); }

static inline cudaError_t cudaGetDeviceCount(int* count) {
    if (!count) return ::cuda_cpu::set_error(cudaErrorInvalidValue, "cudaGetDeviceCount: null pointer");
    *count = ::cuda_cpu::device_count();
    if (*count == 0) return ::cuda_cpu::set_error(cudaErrorNoDevice, "CUDA_CPU_DEVICES=0");
    return cudaSuccess;
}
static inline cudaError_t cudaSetDevice(int device) {
    if (device < 0 || device >= ::cuda_cpu::device_count())
        return ::cuda_cpu::set_error(cudaErrorInvalidDevice, "cudaSetDevice(%d): %d emulated device(s)", device, ::cuda_cpu::device_count());
    ::cuda_cpu::tls_device = device;
    return cudaSuccess;
}
static inline cudaError_t cudaGetDevice(int* device) {
    if (!device) return ::cuda_cpu::set_error(cudaErrorInvalidValue, "cudaGetDevice: null pointer");
    *device = ::cuda_cpu::tls_device;
    return cudaSuccess;
}
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
    if (!prop) return ::cuda_cpu::set_error(cudaErrorInvalidValue, "cudaGetDeviceProperties: null pointer");
    if (device < 0 || device >= ::cuda_cpu::device_count()) return ::cuda_cpu::set_error(cudaErrorInvalidDevice, "cudaGetDeviceProperties(%d)", device);
    memset(prop, 0, sizeof(*prop));
    snprintf(prop->name, sizeof(prop->name), "CUDA-on-CPU emulated device %d", device);
    prop->totalGlobalMem = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE);
    prop->sharedMemPerBlock = ::cuda_cpu::kStaticSharedLimit;
    prop->sharedMemPerBlockOptin = ::cuda_cpu::kDynamicSharedOptinLimit;
    prop->regsPerBlock = 65536;
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    prop->maxThreadsDim[0] = 1024; prop->maxThreadsDim[1] = 1024; prop->maxThreadsDim[2] = 64;
    prop->maxGridSize[0] = 0x7FFFFFFF; prop->maxGridSize[1] = 65535; prop->maxGridSize[2] = 65535;
    prop->multiProcessorCount = ::cuda_cpu::kSmCount;
    prop->major = 9;
    prop->minor = 0;
    return cudaSuccess;
}
static inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
    using namespace ::cuda_cpu;
    if (!value) return set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: null pointer");
    if (device < 0 || device >= device_count()) return set_error(cudaErrorInvalidDevice, "cudaDeviceGetAttribute(%d)", device);
    switch (attr) {
        case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreads; break;
        case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)kStaticSharedLimit; break;
        case cudaDevAttrWarpSize: *value = 32; break;
        case cudaDevAttrMultiProcessorCount: *value = kSmCount; break;
        case cudaDevAttrMaxThreadsPerMultiProcessor: *value = kMaxThreadsPerSm; break;
        case cudaDevAttrComputeCapabilityMajor: *value = 9; break;  // an H100: sm_90
        case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
        case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = (int)kSharedPerSm; break;
        case cudaDevAttrMaxRegistersPerMultiprocessor: *value = kRegistersPerSm; break;
        default: return set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute %d", (int)attr);
    }
    return cudaSuccess;
}
// Blocks of `block_size` threads and `dynamic_smem` bytes of dynamic shared memory that
// fit on one SM at once: the least of the thread, block, register and shared-memory
// limits of kSmCount's device (registers as kAssumedRegistersPerThread, allocated per
// warp; static shared memory is not known before a launch and counts as 0).
template <typename T>
static inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* kernel, int block_size, size_t dynamic_smem) {
    using namespace ::cuda_cpu;
    if (!blocks || !kernel) return set_error(cudaErrorInvalidValue, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: null pointer");
    if (block_size <= 0 || block_size > kMaxThreads) return set_error(cudaErrorInvalidValue, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: block size %d", block_size);
    if (dynamic_smem > dynamic_shared_limit((const void*)kernel)) { *blocks = 0; return cudaSuccess; }
    int warps = (block_size + 31) / 32;
    int by_threads = kMaxThreadsPerSm / (warps * 32);
    int by_registers = kRegistersPerSm / (warps * 32 * kAssumedRegistersPerThread);
    int by_shared = (int)(kSharedPerSm / (dynamic_smem + kSharedReservedPerBlock));
    *blocks = std::min({kMaxBlocksPerSm, by_threads, by_registers, by_shared});
    return cudaSuccess;
}
static inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    if (!free_bytes || !total_bytes) return ::cuda_cpu::set_error(cudaErrorInvalidValue, "cudaMemGetInfo: null pointer");
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    *total_bytes = (size_t)sysconf(_SC_PHYS_PAGES) * page;
    *free_bytes = (size_t)sysconf(_SC_AVPHYS_PAGES) * page;
    return ::cuda_cpu::api_enter();
}
static inline cudaError_t cudaDeviceSynchronize() {
    if (::cuda_cpu::tls_device < ::cuda_cpu::device_count()) ::cuda_cpu::run_all(::cuda_cpu::tls_device);
    return ::cuda_cpu::api_enter();
}
static inline cudaError_t cudaDeviceReset() {
    using namespace ::cuda_cpu;
    if (tls_device >= device_count()) return set_error(cudaErrorNoDevice, "no emulated device");
    run_all(-1);
    {
        Registry& r = registry();
        std::lock_guard<std::mutex> lock(r.mu);
        for (auto it = r.blocks.begin(); it != r.blocks.end();) {
            if (it->second.device == tls_device) {
                free((void*)it->first);
                it = r.blocks.erase(it);
            } else {
                ++it;
            }
        }
        for (int i = 0; i < kMaxDevices; i++) r.peer[tls_device][i] = false;
    }
    std::lock_guard<std::mutex> lock(state().mu);
    state().sticky[tls_device] = cudaSuccess;
    tls_last_error = cudaSuccess;
    return cudaSuccess;
}

static inline cudaError_t cudaMalloc(void** ptr, size_t bytes) {
    using namespace ::cuda_cpu;
    if (!ptr) return set_error(cudaErrorInvalidValue, "cudaMalloc: null pointer");
    *ptr = nullptr;
    if (cudaError_t e = api_enter()) return e;
    if (bytes == 0) return cudaSuccess;
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes) != 0)  // exactly `bytes`, so ASan sees overruns
        return set_error(cudaErrorMemoryAllocation, "cudaMalloc(%zu bytes) failed", bytes);
    memset(p, 0xFF, bytes);  // NaN: reads of memory nobody wrote show up
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.blocks[(uintptr_t)p] = Allocation{bytes, tls_device};
    *ptr = p;
    return cudaSuccess;
}
template <typename T> static inline cudaError_t cudaMalloc(T** ptr, size_t bytes) { return cudaMalloc((void**)ptr, bytes); }

static inline cudaError_t cuda_cpu_free(void* ptr, bool host) {
    using namespace ::cuda_cpu;
    if (!ptr) return cudaSuccess;
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.blocks.find((uintptr_t)ptr);
    if (it == r.blocks.end() || (it->second.device < 0) != host)
        return set_error(cudaErrorInvalidValue, "%s(%p): not a pointer returned by %s", host ? "cudaFreeHost" : "cudaFree", ptr, host ? "cudaMallocHost" : "cudaMalloc");
    r.blocks.erase(it);
    free(ptr);
    return cudaSuccess;
}
static inline cudaError_t cudaFree(void* ptr) {
    ::cuda_cpu::run_all(-1);  // cudaFree waits for the device, as on the GPU
    if (cudaError_t e = ::cuda_cpu::api_enter()) return e;
    return cuda_cpu_free(ptr, false);
}
static inline cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
    using namespace ::cuda_cpu;
    if (!ptr) return set_error(cudaErrorInvalidValue, "cudaMallocHost: null pointer");
    *ptr = nullptr;
    if (bytes == 0) return cudaSuccess;
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes) != 0) return set_error(cudaErrorMemoryAllocation, "cudaMallocHost(%zu bytes) failed", bytes);
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.blocks[(uintptr_t)p] = Allocation{bytes, -1};
    *ptr = p;
    return cudaSuccess;
}
template <typename T> static inline cudaError_t cudaMallocHost(T** ptr, size_t bytes) { return cudaMallocHost((void**)ptr, bytes); }
static inline cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned flags) { (void)flags; return cudaMallocHost(ptr, bytes); }
static inline cudaError_t cudaFreeHost(void* ptr) {
    ::cuda_cpu::run_all(-1);
    return cuda_cpu_free(ptr, true);
}

namespace cuda_cpu {
namespace {
// Checks one side of a copy: device memory (any device when device < 0) or host memory,
// and that [p, p+bytes) lies inside its allocation.
static cudaError_t check_side(const char* api, const char* side, const void* p, size_t bytes, bool want_device) {
    Allocation a{};
    uintptr_t base = find_allocation(p, &a);
    bool is_device = base && a.device >= 0;
    if (p == nullptr && bytes > 0) return set_error(cudaErrorInvalidValue, "%s: null %s pointer", api, side);
    if (is_device != want_device)
        return set_error(cudaErrorInvalidValue, "%s: the %s pointer %p is %s memory, but the copy kind says %s memory", api, side, p,
                         is_device ? "device" : "host", want_device ? "device" : "host");
    if (base && (uintptr_t)p + bytes > base + a.size)
        return set_error(cudaErrorInvalidValue, "%s: %zu bytes at %s offset %zu overrun its %zu-byte allocation", api, bytes, side,
                         (size_t)((uintptr_t)p - base), a.size);
    return cudaSuccess;
}

static cudaError_t memcpy_checked(const char* api, void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    if (kind == cudaMemcpyDefault) {
        Allocation a{};
        bool dd = find_allocation(dst, &a) && a.device >= 0;
        bool sd = find_allocation(src, &a) && a.device >= 0;
        kind = sd && dd ? cudaMemcpyDeviceToDevice : sd ? cudaMemcpyDeviceToHost : dd ? cudaMemcpyHostToDevice : cudaMemcpyHostToHost;
    }
    if ((int)kind < 0 || (int)kind > 3) return set_error(cudaErrorInvalidMemcpyDirection, "%s: copy kind %d", api, (int)kind);
    bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (cudaError_t e = check_side(api, "destination", dst, bytes, dst_dev)) return e;
    if (cudaError_t e = check_side(api, "source", src, bytes, src_dev)) return e;
    return cudaSuccess;
}
}  // namespace
}  // namespace cuda_cpu

static inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = 0) {
    using namespace ::cuda_cpu;
    if (cudaError_t e = api_enter()) return e;
    if (cudaError_t e = memcpy_checked("cudaMemcpy", dst, src, bytes, kind)) return e;
    if (bytes == 0) return cudaSuccess;
    Allocation a{};
    CUstream_st* s = resolve(stream);
    if (deferred() && !find_allocation(src, &a) && find_allocation(dst, &a) && a.device >= 0) {
        // from pageable host memory: CUDA stages the source before returning
        auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + bytes);
        stream_run(s, [=] { memcpy(dst, staged->data(), bytes); });
        return cudaSuccess;
    }
    stream_run(s, [=] { memmove(dst, src, bytes); });
    if (!find_allocation(dst, &a) && find_allocation(src, &a) && a.device >= 0) stream_sync(s);  // to pageable memory: synchronous
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, 0);
    ::cuda_cpu::stream_sync(::cuda_cpu::resolve(0));
    return e != cudaSuccess ? e : ::cuda_cpu::api_enter();
}
static inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream = 0) {
    using namespace ::cuda_cpu;
    if (cudaError_t e = api_enter()) return e;
    if (cudaError_t e = check_side("cudaMemset", "destination", dst, bytes, true)) return e;
    stream_run(resolve(stream), [=] { memset(dst, value, bytes); });
    return cudaSuccess;
}
static inline cudaError_t cudaMemset(void* dst, int value, size_t bytes) { return cudaMemsetAsync(dst, value, bytes, 0); }

static inline cudaError_t cudaDeviceCanAccessPeer(int* can, int device, int peer) {
    int n = ::cuda_cpu::device_count();
    if (!can) return ::cuda_cpu::set_error(cudaErrorInvalidValue, "cudaDeviceCanAccessPeer: null pointer");
    if (device < 0 || device >= n || peer < 0 || peer >= n) return ::cuda_cpu::set_error(cudaErrorInvalidDevice, "cudaDeviceCanAccessPeer(%d, %d)", device, peer);
    *can = device != peer;
    return cudaSuccess;
}
static inline cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned flags) {
    using namespace ::cuda_cpu;
    if (cudaError_t e = api_enter()) return e;
    if (peer < 0 || peer >= device_count() || peer == tls_device || flags != 0)
        return set_error(cudaErrorInvalidDevice, "cudaDeviceEnablePeerAccess(%d) from device %d", peer, tls_device);
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    if (r.peer[tls_device][peer]) return set_error(cudaErrorPeerAccessAlreadyEnabled, "device %d already has access to device %d", tls_device, peer);
    r.peer[tls_device][peer] = true;
    return cudaSuccess;
}
static inline cudaError_t cudaDeviceDisablePeerAccess(int peer) {
    using namespace ::cuda_cpu;
    if (peer < 0 || peer >= device_count()) return set_error(cudaErrorInvalidDevice, "cudaDeviceDisablePeerAccess(%d)", peer);
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    if (!r.peer[tls_device][peer]) return set_error(cudaErrorPeerAccessNotEnabled, "device %d has no access to device %d", tls_device, peer);
    r.peer[tls_device][peer] = false;
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyPeerAsync(void* dst, int dst_device, const void* src, int src_device, size_t bytes, cudaStream_t stream = 0) {
    using namespace ::cuda_cpu;
    if (cudaError_t e = api_enter()) return e;
    int n = device_count();
    if (dst_device < 0 || dst_device >= n || src_device < 0 || src_device >= n)
        return set_error(cudaErrorInvalidDevice, "cudaMemcpyPeer: devices %d <- %d of %d", dst_device, src_device, n);
    if (cudaError_t e = memcpy_checked("cudaMemcpyPeer", dst, src, bytes, cudaMemcpyDeviceToDevice)) return e;
    Allocation a{};
    find_allocation(dst, &a);
    if (a.device != dst_device) return set_error(cudaErrorInvalidValue, "cudaMemcpyPeer: destination is on device %d, not %d", a.device, dst_device);
    find_allocation(src, &a);
    if (a.device != src_device) return set_error(cudaErrorInvalidValue, "cudaMemcpyPeer: source is on device %d, not %d", a.device, src_device);
    stream_run(resolve(stream), [=] { if (bytes) memmove(dst, src, bytes); });
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyPeer(void* dst, int dst_device, const void* src, int src_device, size_t bytes) {
    ::cuda_cpu::run_all(-1);  // ordered after all earlier work on both devices
    cudaError_t e = cudaMemcpyPeerAsync(dst, dst_device, src, src_device, bytes, 0);
    ::cuda_cpu::run_all(-1);
    return e;
}

// __constant__ and __device__ variables are ordinary globals here.
template <typename T>
static inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t bytes, size_t offset = 0, cudaMemcpyKind kind = cudaMemcpyHostToDevice) {
    if (cudaError_t e = ::cuda_cpu::api_enter()) return e;
    if (offset + bytes > sizeof(T)) return ::cuda_cpu::set_error(cudaErrorInvalidValue, "cudaMemcpyToSymbol: %zu bytes at offset %zu into a %zu-byte symbol", bytes, offset, sizeof(T));
    ::cuda_cpu::run_all(-1);
    memcpy((char*)&symbol + offset, src, bytes);
    (void)kind;
    return cudaSuccess;
}
template <typename T>
static inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t bytes, size_t offset = 0, cudaMemcpyKind kind = cudaMemcpyDeviceToHost) {
    if (cudaError_t e = ::cuda_cpu::api_enter()) return e;
    if (offset + bytes > sizeof(T)) return ::cuda_cpu::set_error(cudaErrorInvalidValue, "cudaMemcpyFromSymbol: %zu bytes at offset %zu from a %zu-byte symbol", bytes, offset, sizeof(T));
    ::cuda_cpu::run_all(-1);
    memcpy(dst, (const char*)&symbol + offset, bytes);
    (void)kind;
    return cudaSuccess;
}

template <typename T>
static inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
    using namespace ::cuda_cpu;
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute %d", (int)attr);
    if (value < 0 || (size_t)value > kDynamicSharedOptinLimit)
        return set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: %d bytes of dynamic shared memory (limit %zu)", value, kDynamicSharedOptinLimit);
    std::lock_guard<std::mutex> lock(shared_optin_mu);
    shared_optin()[(const void*)kernel] = (size_t)value;
    return cudaSuccess;
}

static inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
    using namespace ::cuda_cpu;
    if (!stream) return set_error(cudaErrorInvalidValue, "cudaStreamCreate: null pointer");
    if (cudaError_t e = api_enter()) return e;
    CUstream_st* s = new CUstream_st;
    s->device = tls_device;
    s->flags = flags;
    std::lock_guard<std::recursive_mutex> lock(streams().mu);
    streams().all.push_back(s);
    *stream = s;
    return cudaSuccess;
}
static inline cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }
static inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    using namespace ::cuda_cpu;
    if (!stream || stream->destroyed) return set_error(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: not a live stream");
    stream_sync(stream);  // its work still completes, as on the GPU
    std::lock_guard<std::recursive_mutex> lock(streams().mu);
    stream->destroyed = true;
    auto& all = streams().all;
    all.erase(std::find(all.begin(), all.end(), stream));
    return cudaSuccess;
}
static inline cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    using namespace ::cuda_cpu;
    if (stream && stream->destroyed) return set_error(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize: destroyed stream");
    stream_sync(resolve(stream));
    return api_enter();
}
// Queries complete the work they ask about, so a polling loop ends in deferred mode too;
// they report cudaErrorNotReady when there was work left.
static inline cudaError_t cudaStreamQuery(cudaStream_t stream) {
    using namespace ::cuda_cpu;
    if (stream && stream->destroyed) return set_error(cudaErrorInvalidResourceHandle, "cudaStreamQuery: destroyed stream");
    CUstream_st* s = resolve(stream);
    std::lock_guard<std::recursive_mutex> lock(streams().mu);
    bool busy = s->done < s->enqueued;
    stream_sync(s);
    if (cudaError_t e = api_enter()) return e;
    return busy ? cudaErrorNotReady : cudaSuccess;
}
static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
    using namespace ::cuda_cpu;
    if (!event) return set_error(cudaErrorInvalidValue, "cudaEventCreate: null pointer");
    *event = new CUevent_st;
    (*event)->device = tls_device;
    (*event)->flags = flags;
    return cudaSuccess;
}
static inline cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }
static inline cudaError_t cudaEventDestroy(cudaEvent_t event) {
    if (!event) return ::cuda_cpu::set_error(cudaErrorInvalidResourceHandle, "cudaEventDestroy(0)");
    std::lock_guard<std::recursive_mutex> lock(::cuda_cpu::streams().mu);
    if (event->stream) ::cuda_cpu::run_until(event->stream, event->seq);  // its record op points at it
    delete event;
    return cudaSuccess;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = 0) {
    using namespace ::cuda_cpu;
    if (!event) return set_error(cudaErrorInvalidResourceHandle, "cudaEventRecord: null event");
    if (cudaError_t e = api_enter()) return e;
    CUstream_st* s = resolve(stream);
    if (s->device != event->device) return set_error(cudaErrorInvalidResourceHandle, "cudaEventRecord: event of device %d on a stream of device %d", event->device, s->device);
    std::lock_guard<std::recursive_mutex> lock(streams().mu);
    event->stream = s;
    event->seq = s->enqueued + 1;
    stream_run(s, [event] { event->time = std::chrono::steady_clock::now(); });
    return cudaSuccess;
}
static inline bool cuda_cpu_event_done(cudaEvent_t event) { return !event->stream || event->stream->done >= event->seq; }
static inline cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    using namespace ::cuda_cpu;
    if (!event) return set_error(cudaErrorInvalidResourceHandle, "cudaEventSynchronize: null event");
    {
        std::lock_guard<std::recursive_mutex> lock(streams().mu);
        if (event->stream) run_until(event->stream, event->seq);
    }
    return api_enter();
}
static inline cudaError_t cudaEventQuery(cudaEvent_t event) {
    using namespace ::cuda_cpu;
    if (!event) return set_error(cudaErrorInvalidResourceHandle, "cudaEventQuery: null event");
    std::lock_guard<std::recursive_mutex> lock(streams().mu);
    bool busy = !cuda_cpu_event_done(event);
    if (event->stream) run_until(event->stream, event->seq);
    if (cudaError_t e = api_enter()) return e;
    return busy ? cudaErrorNotReady : cudaSuccess;
}
static inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    using namespace ::cuda_cpu;
    if (!ms || !start || !end) return set_error(cudaErrorInvalidValue, "cudaEventElapsedTime: null argument");
    if ((start->flags | end->flags) & cudaEventDisableTiming) return set_error(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event was created with cudaEventDisableTiming");
    if (!start->stream || !end->stream) return set_error(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event was never recorded");
    std::lock_guard<std::recursive_mutex> lock(streams().mu);
    if (!cuda_cpu_event_done(start) || !cuda_cpu_event_done(end)) return set_error(cudaErrorNotReady, "cudaEventElapsedTime: an event has not completed");
    *ms = std::chrono::duration<float, std::milli>(end->time - start->time).count();
    return cudaSuccess;
}
static inline cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags = 0) {
    using namespace ::cuda_cpu;
    if (!event) return set_error(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent: null event");
    if (cudaError_t e = api_enter()) return e;
    std::lock_guard<std::recursive_mutex> lock(streams().mu);
    if (!event->stream) return cudaSuccess;  // never recorded: nothing to wait for
    stream_run(resolve(stream), [] {}, {{event->stream, event->seq}});
    return cudaSuccess;
}
