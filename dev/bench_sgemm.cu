/*
bench_sgemm: speed of the CUDA-on-CPU runtime on a classic shared-memory SGEMM.

C[M][N] = A[M][K] @ B[K][N], row-major. One 256-thread block computes a 64x64 tile of C;
each thread owns a 4x4 sub-tile (rows ty+16i, columns tx+16j: neighbouring threads read
neighbouring addresses). Per K-tile of 16 the block stages A[64][16] and B[16][64] in shared
memory: barrier, 16 rank-1 updates, barrier. Built by `make bench` with g++ only; it prints
GFLOP/s per core with the runtime's fast path on and off (CUDA_CPU_FASTPATH=0: one
fiber per CUDA thread from the start), and the cost per CUDA thread of a barrier-free
saxpy, the case the fast path is for.
*/
#ifdef __CUDACC__
#error "bench_sgemm.cu measures the CPU runtime: build it with g++ (make bench)"
#endif
#include "dev/cuda_cpu.h"

#include <chrono>
#include <time.h>
#include <vector>

constexpr int TILE = 64, TILE_K = 16, THREADS = 256;

__global__ void sgemm_tiled(const float* A, const float* B, float* C, int M, int N, int K) {
    SHARED(float, As, [TILE_K][TILE + 1]);  // A tile stored k-major; +1 avoids bank conflicts
    SHARED(float, Bs, [TILE_K][TILE]);
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    int row0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        // 1024 elements of each tile, 4 per thread, coalesced along rows
        for (int e = threadIdx.x; e < TILE * TILE_K; e += THREADS) {
            int r = e / TILE_K, c = e % TILE_K;
            As[c][r] = (row0 + r < M && k0 + c < K) ? A[(size_t)(row0 + r) * K + k0 + c] : 0.0f;
            int br = e / TILE, bc = e % TILE;
            Bs[br][bc] = (k0 + br < K && col0 + bc < N) ? B[(size_t)(k0 + br) * N + col0 + bc] : 0.0f;
        }
        __syncthreads();
        for (int k = 0; k < TILE_K; k++) {
            float a[4], b[4];
            for (int i = 0; i < 4; i++) a[i] = As[k][ty + 16 * i];
            for (int j = 0; j < 4; j++) b[j] = Bs[k][tx + 16 * j];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            int r = row0 + ty + 16 * i, c = col0 + tx + 16 * j;
            if (r < M && c < N) C[(size_t)r * N + c] = acc[i][j];
        }
}

// A barrier-free kernel with little work per thread: what the fast path (one fiber per
// block instead of one per thread) is for.
__global__ void saxpy(int n, float a, const float* x, float* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}

static double cpu_seconds() {  // all threads of the process: a busy machine does not skew it
    timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

struct Rate {
    double wall, per_core;  // GFLOP/s by wall-clock time; GFLOP/s per CPU-second used
};

static void check(cudaError_t e) {
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess) {
        fprintf(stderr, "error: %s\n", cudaGetErrorString(e));
        exit(1);
    }
}

static Rate run(int M, int N, int K, const float* dA, const float* dB, float* dC, int reps) {
    dim3 grid((N + TILE - 1) / TILE, (M + TILE - 1) / TILE);
    KERNEL_LAUNCH(sgemm_tiled, grid, THREADS, 0, 0, dA, dB, dC, M, N, K);  // warm-up
    auto t0 = std::chrono::steady_clock::now();
    double c0 = cpu_seconds();
    for (int r = 0; r < reps; r++) KERNEL_LAUNCH(sgemm_tiled, grid, THREADS, 0, 0, dA, dB, dC, M, N, K);
    check(cudaDeviceSynchronize());
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double cpu = cpu_seconds() - c0;
    double gflop = 2.0 * M * N * K * reps / 1e9;
    return Rate{gflop / s, gflop / cpu};
}

int main(int argc, char** argv) {
    int n = argc > 1 ? atoi(argv[1]) : 512;
    int reps = argc > 2 ? atoi(argv[2]) : 3;
    if (n <= 0 || reps <= 0) {
        fprintf(stderr, "usage: bench_sgemm [n=512] [reps=3]\n");
        return 2;
    }
    std::vector<float> hA((size_t)n * n), hB((size_t)n * n), hC((size_t)n * n);
    for (size_t i = 0; i < hA.size(); i++) {
        hA[i] = (float)((i * 7) % 13) / 13.0f - 0.5f;
        hB[i] = (float)((i * 5) % 11) / 11.0f - 0.5f;
    }
    float *dA, *dB, *dC;
    size_t bytes = hA.size() * sizeof(float);
    cudaMalloc(&dA, bytes);
    cudaMalloc(&dB, bytes);
    cudaMalloc(&dC, bytes);
    cudaMemcpy(dA, hA.data(), bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(dB, hB.data(), bytes, cudaMemcpyHostToDevice);

    // check one row of C against a double-precision product
    run(n, n, n, dA, dB, dC, 1);
    check(cudaMemcpy(hC.data(), dC, bytes, cudaMemcpyDeviceToHost));
    double max_err = 0;
    for (int c = 0; c < n; c++) {
        double ref = 0;
        for (int k = 0; k < n; k++) ref += (double)hA[(size_t)(n / 3) * n + k] * hB[(size_t)k * n + c];
        max_err = std::max(max_err, fabs(ref - hC[(size_t)(n / 3) * n + c]));
    }

    const char* w = getenv("CUDA_CPU_WORKERS");
    int workers = w ? atoi(w) : (int)std::thread::hardware_concurrency();
    double saxpy_ns[2];
    Rate rate[2];
    for (int fast = 1; fast >= 0; fast--) {
        setenv("CUDA_CPU_FASTPATH", fast ? "1" : "0", 1);
        rate[fast] = run(n, n, n, dA, dB, dC, reps);
        int elements = n * n;  // reuses A and C
        double c0 = cpu_seconds();
        for (int r = 0; r < 10; r++) KERNEL_LAUNCH(saxpy, (elements + 255) / 256, 256, 0, 0, elements, 2.0f, dA, dC);
        check(cudaDeviceSynchronize());
        saxpy_ns[fast] = (cpu_seconds() - c0) / (10.0 * elements) * 1e9;
    }
    printf("sgemm %dx%dx%d, 64x64 tiles, 256 threads, 2 barriers per K-tile; %d worker(s); max |err| vs fp64 %.1e\n",
           n, n, n, workers, max_err);
    printf("                 GFLOP/s per core    GFLOP/s wall-clock    saxpy, CPU ns per CUDA thread\n");
    printf("                 (per CPU-second)    (all workers)         (no barrier: the fast path's case)\n");
    for (int fast = 1; fast >= 0; fast--)
        printf("  fast path %-4s   %6.2f              %6.2f                %6.1f\n", fast ? "on" : "off",
               rate[fast].per_core, rate[fast].wall, saxpy_ns[fast]);
    return 0;
}
