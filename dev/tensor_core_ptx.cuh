/*
tensor_core_ptx.cuh: the rest of the tensor-core toolkit as inline PTX, for the GPU build
(sm_80 and later): the instructions that the CPU runtime emulates (dev/cuda_cpu.h) but
train_alexnet.cu's kernels do not use, kept here for the kernel ladder's experiments
(ldmatrix .x2 and .trans, cp.async pipelines). The ones the kernels use (mma, ldmatrix.x4,
the conversions) are in section 0 of train_alexnet.cu. Each function stands for exactly
one PTX instruction and has the signature of its CPU emulation (which adds defaulted
file/line parameters for its error reports), so a kernel that calls them builds with nvcc
and with g++ alike. dev/cuda/common.h includes this file, so the ladder's GPU build
compiles it.

Fragment layouts and the ordering rules are described with the emulation in
dev/cuda_cpu.h and in doc/cpu-runtime.md.
*/
#pragma once
#ifndef __CUDACC__
#error "dev/tensor_core_ptx.cuh is for nvcc; the CPU build gets these functions from dev/cuda_cpu.h"
#endif

// ldmatrix is asm volatile: it is warp-synchronous, so the compiler must neither drop
// nor duplicate it. ldmatrix and the cp.async family touch memory the
// compiler cannot see through their operands, hence the "memory" clobbers (no shared
// store may sink below an ldmatrix, no shared load rise above a wait).

__device__ __forceinline__ void ldmatrix_x2(unsigned r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"((unsigned)__cvta_generic_to_shared(row))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x2_trans(unsigned r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"((unsigned)__cvta_generic_to_shared(row))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row))
                 : "memory");
}

__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :
                 : "r"((unsigned)__cvta_generic_to_shared(shared_dst)), "l"(__cvta_generic_to_global(global_src))
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a count of groups");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
