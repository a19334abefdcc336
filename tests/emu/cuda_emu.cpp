// cuda_emu.cpp: the CPU side of the kernel emulator (tests/emu/cuda_emu.h): the block scheduler with its
// fibers and barriers, the CUDA runtime calls the backend makes (memory is host memory, every call runs
// at once, in order), and the cuBLASLt calls of cuda/context.cu as a plain column-major product.
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <mutex>
#include <vector>

#include "tests/emu/cuda_emu.h"

#if !defined(__x86_64__)
#error "the kernel emulator switches fibers with x86-64 code"
#endif

// Under AddressSanitizer (make EMU_ASAN=1 test-emu: out-of-bounds accesses of the kernels to device
// buffers, which are exact-size host allocations there) every stack switch is announced to it.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_ASAN 1
#define EMU_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define EMU_FINISH_SWITCH(saved, bottom, size) __sanitizer_finish_switch_fiber(saved, bottom, size)
#define EMU_UNPOISON(p, n) __asan_unpoison_memory_region(p, n)
// the tests free what they check, not every buffer of a failed assertion: out-of-bounds only
extern "C" const char *__asan_default_options(void) { return "detect_leaks=0"; }
#else
#define EMU_ASAN 0
#define EMU_START_SWITCH(save, bottom, size) ((void)0)
#define EMU_FINISH_SWITCH(saved, bottom, size) ((void)0)
#define EMU_UNPOISON(p, n) ((void)0)
#endif

void emu_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cuda emulator: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

// ---- fiber switch --------------------------------------------------------------------------------
// emu_switch(&save_sp, next_sp): pushes the callee-saved registers and the FP control words, saves the
// stack pointer, loads the other one and pops its registers.
extern "C" void emu_switch(void **save_sp, void *next_sp);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");

#define EMU_MAX_THREADS 1024
#define EMU_STACK_BYTES (256 << 10)
#define EMU_SMEM_DEFAULT (48 << 10)
#define EMU_SMEM_MAX (227 << 10)

struct emu_copy {
    void *dst;
    const void *src;
    int bytes, ok;
    long group;
};

struct emu_thread {
    void *sp;
    uint3 tid;
    int linear, done;
    const unsigned *wait_on;  // the barrier generation it waits to change (NULL: runnable)
    unsigned wait_gen;
    char *stack;
    std::vector<emu_copy> copies;  // cp.async not yet waited for
    long groups;                   // cp.async groups committed
    void *asan_fake;               // AddressSanitizer's fake stack of the fiber while switched out
};

struct emu_warp {
    int live, arrived;
    unsigned gen;
    uint64_t slot[2][32][4];  // collectives alternate between the two by barrier generation
};

struct emu_block {
    int n, live;
    emu_thread th[EMU_MAX_THREADS];
    emu_warp warps[EMU_MAX_THREADS / 32];
    int bar_arrived, bar_and, and_result;
    unsigned bar_gen;
    const std::function<void()> *body;
    void *sched_sp;
    emu_thread *cur;
    int progress;
    int eager_copies;  // cp.async lands at once (else at its wait_group)
    unsigned char *smem;
    size_t smem_bytes;
    void *asan_fake;  // the scheduler's, while a fiber runs
    const void *sched_bottom;
    size_t sched_size;
};

thread_local const uint3 *emu_cur_tid;
thread_local uint3 emu_block_idx;
thread_local dim3 emu_block_dim, emu_grid_dim;
static thread_local emu_block *tb;  // this CPU thread's block

// Waits until *gen differs from g; the scheduler does not resume the fiber before.
static void emu_wait(const unsigned *gen, unsigned g) {
    emu_thread *t = tb->cur;
    t->wait_on = gen;
    t->wait_gen = g;
    EMU_START_SWITCH(&t->asan_fake, tb->sched_bottom, tb->sched_size);
    emu_switch(&t->sp, tb->sched_sp);
    EMU_FINISH_SWITCH(t->asan_fake, NULL, NULL);
    t->wait_on = NULL;
}

static void fiber_main(void) {
    emu_block *b = tb;
    EMU_FINISH_SWITCH(NULL, &b->sched_bottom, &b->sched_size);
    (*b->body)();
    emu_thread *t = b->cur;
    t->done = 1;
    b->live--;
    b->progress = 1;
    emu_warp &w = b->warps[t->linear / 32];
    w.live--;
    if (w.arrived > 0 && w.arrived == w.live) {  // the lanes left are all waiting for this one
        w.arrived = 0;
        w.gen++;
    }
    if (b->bar_arrived > 0 && b->bar_arrived == b->live) {
        b->bar_arrived = 0;
        b->and_result = b->bar_and;
        b->bar_and = 1;
        b->bar_gen++;
    }
    EMU_START_SWITCH(NULL, b->sched_bottom, b->sched_size);
    emu_switch(&t->sp, b->sched_sp);
    emu_die("a finished fiber was resumed");
}

// A fresh fiber's stack: emu_switch pops the FP control words, six registers and returns into
// fiber_main with the stack aligned as at a call.
static void fiber_init(emu_thread *t) {
    if (!t->stack) t->stack = (char *)aligned_alloc(64, EMU_STACK_BYTES);
    EMU_UNPOISON(t->stack, EMU_STACK_BYTES);  // frames of the block before
    uint64_t *top = (uint64_t *)(t->stack + EMU_STACK_BYTES);
    *--top = 0;                          // fiber_main's return address (never used)
    *--top = (uint64_t)(uintptr_t)fiber_main;
    for (int i = 0; i < 6; i++) *--top = 0;
    *--top = 0x037f00001f80ull;          // mxcsr 0x1f80, x87 control word 0x037f
    t->sp = top;
}

static void block_barrier(void) {
    emu_block *b = tb;
    unsigned g = b->bar_gen;
    b->bar_arrived++;
    b->progress = 1;
    if (b->bar_arrived == b->live) {
        b->bar_arrived = 0;
        b->and_result = b->bar_and;
        b->bar_and = 1;
        b->bar_gen++;
        return;
    }
    emu_wait(&b->bar_gen, g);
    b->progress = 1;
}

void emu_syncthreads(void) { block_barrier(); }
int emu_syncthreads_and(int pred) {
    if (!pred) tb->bar_and = 0;
    block_barrier();
    return tb->and_result;
}

static void warp_barrier(void) {
    emu_block *b = tb;
    emu_warp &w = b->warps[b->cur->linear / 32];
    unsigned g = w.gen;
    w.arrived++;
    b->progress = 1;
    if (w.arrived == w.live) {
        w.arrived = 0;
        w.gen++;
        return;
    }
    emu_wait(&w.gen, g);
    b->progress = 1;
}

void emu_syncwarp(void) { warp_barrier(); }
int emu_lane(void) { return tb->cur->linear % 32; }

// One barrier per collective: the exchange at generation g writes and reads buffer g % 2; a lane can only
// write that buffer again at generation g + 2, after every lane has passed barrier g + 1, i.e. has read.
const uint64_t (*emu_warp_exchange(const uint64_t mine[4]))[4] {
    emu_warp &w = tb->warps[tb->cur->linear / 32];
    uint64_t(*buf)[4] = w.slot[w.gen & 1];
    memcpy(buf[tb->cur->linear % 32], mine, sizeof buf[0]);
    warp_barrier();
    return buf;
}

void *emu_dyn_smem(void) { return tb->smem; }

void emu_check_aligned(const void *p, int bytes, const char *what) {
    if ((uintptr_t)p % (uintptr_t)bytes)
        emu_die("%s %p is not %d-byte aligned (block %u,%u,%u thread %u,%u,%u)", what, p, bytes, emu_block_idx.x,
                emu_block_idx.y, emu_block_idx.z, emu_cur_tid->x, emu_cur_tid->y, emu_cur_tid->z);
}

void emu_cp_async(void *dst, const void *src, int bytes, bool ok) {
    emu_check_aligned(dst, bytes, "cp.async shared address");
    if (ok) emu_check_aligned(src, bytes, "cp.async global address");
    if (tb->eager_copies) {
        if (ok)
            memcpy(dst, src, (size_t)bytes);
        else
            memset(dst, 0, (size_t)bytes);
        return;
    }
    emu_thread *t = tb->cur;
    t->copies.push_back({dst, src, bytes, ok, t->groups});
}
void emu_cp_commit(void) { tb->cur->groups++; }
void emu_cp_wait(int newest_left) {
    emu_thread *t = tb->cur;
    std::vector<emu_copy> keep;
    for (const emu_copy &c : t->copies) {
        if (c.group < t->groups - newest_left) {  // committed, and not among the newest N groups
            if (c.ok)
                memcpy(c.dst, c.src, (size_t)c.bytes);
            else
                memset(c.dst, 0, (size_t)c.bytes);
        } else {
            keep.push_back(c);
        }
    }
    t->copies.swap(keep);
}

// ---- the grid ----------------------------------------------------------------------------------
static cudaError_t last_error = cudaSuccess;
std::atomic<long> emu_pdl_waits{0};
const char *emu_site_name(const char *file, int line) {
    static std::mutex mu;
    static std::set<std::string> names;
    char buf[512];
    snprintf(buf, sizeof buf, "%s:%d", file, line);
    std::lock_guard<std::mutex> lk(mu);
    return names.insert(buf).first->c_str();
}
static std::mutex attr_mutex;
static std::map<const void *, int> max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize

static void run_block(emu_block *b, uint3 bid, const emu_cfg &cfg) {
    emu_block_idx = bid;
    emu_block_dim = cfg.block;
    emu_grid_dim = cfg.grid;
    memset(b->smem, 0xff, cfg.smem);  // poison: every byte read must have been written
    b->live = b->n;
    b->bar_arrived = 0;
    b->bar_and = 1;
    for (int w = 0; w < (b->n + 31) / 32; w++) {
        b->warps[w].live = std::min(32, b->n - 32 * w);
        b->warps[w].arrived = 0;
    }
    int i = 0;
    for (unsigned z = 0; z < cfg.block.z; z++)
        for (unsigned y = 0; y < cfg.block.y; y++)
            for (unsigned x = 0; x < cfg.block.x; x++, i++) {
                emu_thread *t = &b->th[i];
                t->tid = make_uint3(x, y, z);
                t->linear = i;
                t->done = 0;
                t->wait_on = NULL;
                t->copies.clear();
                t->groups = 0;
                fiber_init(t);
            }
    // Warps run one at a time, each as far as it gets (to a __syncthreads the others have not reached, or
    // to its end), in an order that changes from block to block: first to last, last to first, shuffled.
    // A warp that runs ahead overwrites shared memory others still read, or reads what they have not
    // written yet, wherever a barrier is missing. The lanes of a warp take turns between collectives.
    // cp.async copies land at once in every other triple of blocks (a copy into a buffer other warps still
    // read, issued without a barrier between, shows), else only at the wait_group that covers them (a read
    // before that wait shows).
    int nw = (b->n + 31) / 32, order[EMU_MAX_THREADS / 32];
    long lin = (long)bid.x + (long)cfg.grid.x * (bid.y + (long)cfg.grid.y * bid.z);
    b->eager_copies = (int)(lin / 3 % 2);
    for (int w = 0; w < nw; w++) order[w] = lin % 3 == 1 ? nw - 1 - w : w;
    if (lin % 3 == 2) {
        uint64_t h = 0x9e3779b97f4a7c15ull * (uint64_t)(lin + 1);
        for (int w = nw - 1; w > 0; w--) {
            h ^= h >> 29;
            h *= 0xbf58476d1ce4e5b9ull;
            int j = (int)(h % (uint64_t)(w + 1));
            std::swap(order[w], order[j]);
        }
    }
    while (b->live > 0) {
        int any = 0;
        for (int k = 0; k < nw; k++) {
            int w = order[k];
            do {
                b->progress = 0;
                for (i = 32 * w; i < std::min(b->n, 32 * w + 32); i++) {
                    emu_thread *t = &b->th[i];
                    if (t->done || (t->wait_on && *t->wait_on == t->wait_gen)) continue;
                    b->cur = t;
                    emu_cur_tid = &t->tid;
                    EMU_START_SWITCH(&b->asan_fake, t->stack, EMU_STACK_BYTES);
                    emu_switch(&b->sched_sp, t->sp);
                    EMU_FINISH_SWITCH(b->asan_fake, NULL, NULL);
                }
                any |= b->progress;
            } while (b->progress);
        }
        if (!any && b->live > 0)
            emu_die("deadlock in block (%u,%u,%u): %d threads wait at a barrier or warp collective that the others "
                    "never reach (a __syncthreads under a condition that is not uniform?)",
                    bid.x, bid.y, bid.z, b->live);
    }
}

// MOSFT_EMU_PROFILE=1: CPU seconds per kernel and in the products, on stderr at exit (what slows a test).
struct emu_prof_entry {
    long calls;
    double secs;
};
static std::map<std::string, emu_prof_entry> prof;
static emu_prof_entry prof_gemm;
static int prof_on = -1;
static void prof_dump(void) {
    std::vector<std::pair<double, std::string>> v;
    for (auto &kv : prof) v.push_back({kv.second.secs, kv.first});
    std::sort(v.rbegin(), v.rend());
    fprintf(stderr, "emulator profile: %8.2f s %7ld x  cuBLASLt products\n", prof_gemm.secs, prof_gemm.calls);
    for (auto &e : v) fprintf(stderr, "emulator profile: %8.2f s %7ld x  %s\n", e.first, prof[e.second].calls, e.second.c_str());
}
static int prof_enabled(void) {
    if (prof_on < 0) {
        const char *e = getenv("MOSFT_EMU_PROFILE");
        prof_on = e && *e && strcmp(e, "0");
        if (prof_on) atexit(prof_dump);
    }
    return prof_on;
}
static void run_grid(const void *kernel, const emu_cfg &cfg, const std::function<void()> &body);
void emu_run_grid(const void *kernel, const emu_cfg &cfg, const std::function<void()> &body) {
    if (!prof_enabled()) {
        run_grid(kernel, cfg, body);
        return;
    }
    double t0 = omp_get_wtime();
    run_grid(kernel, cfg, body);
    emu_prof_entry &p = prof[cfg.name];
    p.calls++;
    p.secs += omp_get_wtime() - t0;
}

static void run_grid(const void *kernel, const emu_cfg &cfg, const std::function<void()> &body) {
    long n = (long)cfg.block.x * cfg.block.y * cfg.block.z;
    long blocks = (long)cfg.grid.x * cfg.grid.y * cfg.grid.z;
    int limit = EMU_SMEM_DEFAULT;
    {
        std::lock_guard<std::mutex> lk(attr_mutex);
        auto it = max_dyn_smem.find(kernel);
        if (it != max_dyn_smem.end()) limit = it->second;
    }
    if (n < 1 || n > EMU_MAX_THREADS || cfg.grid.y > 65535 || cfg.grid.z > 65535 || cfg.smem > (size_t)limit) {
        last_error = cfg.smem > (size_t)limit ? cudaErrorInvalidValue : cudaErrorInvalidConfiguration;
        return;
    }
    if (blocks == 0) return;
#pragma omp parallel
    {
        if (!tb) {
            tb = new emu_block();
            tb->smem = (unsigned char *)aligned_alloc(128, EMU_SMEM_MAX);
        }
        tb->n = (int)n;
        tb->body = &body;
#pragma omp for schedule(dynamic, 1)
        for (long k = 0; k < blocks; k++) {
            uint3 bid = make_uint3((unsigned)(k % cfg.grid.x), (unsigned)(k / cfg.grid.x % cfg.grid.y),
                                   (unsigned)(k / ((long)cfg.grid.x * cfg.grid.y)));
            run_block(tb, bid, cfg);
        }
    }
}

// ---- the runtime API: host memory, everything synchronous -----------------------------------------
extern "C" {
cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d) {
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "mosft CPU emulator");
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 4;
    p->totalGlobalMem = (size_t)8 << 30;
    p->sharedMemPerBlockOptin = EMU_SMEM_MAX;
    p->sharedMemPerBlock = EMU_SMEM_DEFAULT;
    p->maxThreadsPerBlock = EMU_MAX_THREADS;
    p->warpSize = 32;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d) {
    *v = a == cudaDevAttrMultiProcessorCount                ? 4
         : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? EMU_SMEM_MAX
         : a == cudaDevAttrComputeCapabilityMajor       ? 9  // an H100, as cudaGetDeviceProperties says
                                                        : 0;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetStreamPriorityRange(int *lo, int *hi) { *lo = 0; *hi = -1; return cudaSuccess; }
cudaError_t cudaGetLastError(void) { cudaError_t e = last_error; last_error = cudaSuccess; return e; }
cudaError_t cudaPeekAtLastError(void) { return last_error; }
const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulator: more dynamic shared memory than allowed?)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    default: return "emulator error";
    }
}
const char *cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }

cudaError_t cudaMalloc(void **p, size_t bytes) {
    // 256-byte aligned like the device's; the exact size, so that AddressSanitizer sees any access past it
    if (posix_memalign(p, 256, bytes ? bytes : 1)) return cudaErrorMemoryAllocation;
    return cudaSuccess;
}
cudaError_t cudaFree(void *p) { free(p); return cudaSuccess; }
cudaError_t cudaMallocHost(void **p, size_t bytes) { return cudaMalloc(p, bytes); }
cudaError_t cudaFreeHost(void *p) { free(p); return cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t *fr, size_t *tot) { *fr = (size_t)6 << 30; *tot = (size_t)8 << 30; return cudaSuccess; }
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, enum cudaMemcpyKind k) { memmove(d, s, n); return cudaSuccess; }
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, enum cudaMemcpyKind k, cudaStream_t st) {
    memmove(d, s, n);
    return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void *d, size_t dp, const void *s, size_t sp, size_t w, size_t h, enum cudaMemcpyKind k,
                              cudaStream_t st) {
    for (size_t r = 0; r < h; r++) memmove((char *)d + r * dp, (const char *)s + r * sp, w);
    return cudaSuccess;
}
cudaError_t cudaMemset(void *p, int v, size_t n) { memset(p, v, n); return cudaSuccess; }
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t st) { memset(p, v, n); return cudaSuccess; }
cudaError_t cudaMemcpyToSymbol(const void *sym, const void *src, size_t n, size_t off, enum cudaMemcpyKind k) {
    memcpy((char *)sym + off, src, n);
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamCreate(cudaStream_t *s) { *s = (cudaStream_t)malloc(1); return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f) { return cudaStreamCreate(s); }
cudaError_t cudaStreamCreateWithPriority(cudaStream_t *s, unsigned f, int prio) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) { free(s); return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t s) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned f) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t *e) { *e = (cudaEvent_t)malloc(sizeof(double)); return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned f) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) { free(e); return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) { *(double *)e = omp_get_wtime(); return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t e) { return cudaSuccess; }
cudaError_t cudaEventQuery(cudaEvent_t e) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = (float)(1e3 * (*(double *)b - *(double *)a));
    return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void *f, enum cudaFuncAttribute a, int v) {
    if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (v < 0 || v > EMU_SMEM_MAX) return cudaErrorInvalidValue;
        std::lock_guard<std::mutex> lk(attr_mutex);
        max_dyn_smem[f] = v;
    }
    return cudaSuccess;
}
// An H100-like answer (228 KiB of shared memory, 2048 threads and 32 blocks a multiprocessor; the
// registers are not known here), so that launchers that size their grids by it take their real paths.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *n, const void *f, int threads, size_t smem) {
    if (threads <= 0 || threads > EMU_MAX_THREADS) return cudaErrorInvalidValue;
    int by_threads = 2048 / threads, by_smem = smem ? (int)((228u << 10) / (smem + 1024)) : 32;
    *n = by_threads < by_smem ? by_threads : by_smem;
    if (*n > 32) *n = 32;
    return cudaSuccess;
}
cudaError_t cudaProfilerStart(void) { return cudaSuccess; }
cudaError_t cudaProfilerStop(void) { return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int *v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int *v) { *v = 13000; return cudaSuccess; }
}

// ---- cuBLASLt: the descriptors cuda/context.cu makes, and a column-major product ----------------------
struct emu_lt_desc {
    cublasOperation_t ta, tb;
};
struct emu_lt_layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld, stride;
    int32_t batch;
};

extern "C" {
cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) { *h = (cublasLtHandle_t)malloc(1); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) { free(h); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t c, cudaDataType_t s) {
    if (c != CUBLAS_COMPUTE_32F || s != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    emu_lt_desc *e = (emu_lt_desc *)calloc(1, sizeof *e);
    e->ta = e->tb = CUBLAS_OP_N;
    *d = (cublasLtMatmulDesc_t)e;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { free(d); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, const void *v,
                                              size_t n) {
    emu_lt_desc *e = (emu_lt_desc *)d;
    if (a == CUBLASLT_MATMUL_DESC_TRANSA) memcpy(&e->ta, v, sizeof e->ta);
    else if (a == CUBLASLT_MATMUL_DESC_TRANSB) memcpy(&e->tb, v, sizeof e->tb);
    else if (a != CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET) return CUBLAS_STATUS_NOT_SUPPORTED;  // unknown to the emulator
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType t, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    emu_lt_layout *e = (emu_lt_layout *)calloc(1, sizeof *e);
    *e = {t, rows, cols, ld, 0, 1};
    if (ld < (int64_t)rows) return CUBLAS_STATUS_INVALID_VALUE;
    *l = (cublasLtMatrixLayout_t)e;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { free(l); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t a,
                                                const void *v, size_t n) {
    emu_lt_layout *e = (emu_lt_layout *)l;
    if (a == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT) memcpy(&e->batch, v, sizeof e->batch);
    else if (a == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET) memcpy(&e->stride, v, sizeof e->stride);
    else return CUBLAS_STATUS_NOT_SUPPORTED;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = (cublasLtMatmulPreference_t)malloc(1);
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { free(p); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t a,
                                                    const void *v, size_t n) {
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t dd, cublasLtMatmulPreference_t p, int n,
                                              cublasLtMatmulHeuristicResult_t *res, int *found) {
    memset(res, 0, sizeof *res);
    res->state = CUBLAS_STATUS_SUCCESS;
    *found = n > 0;
    return CUBLAS_STATUS_SUCCESS;
}

static float lt_load(const void *p, cudaDataType t, int64_t i) {
    if (t == CUDA_R_32F) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return __uint_as_float((uint32_t)h << 16);
}
static void lt_store(void *p, cudaDataType t, int64_t i, float v) {
    if (t == CUDA_R_32F) {
        ((float *)p)[i] = v;
    } else {
        __nv_bfloat16 b = __float2bfloat16_rn(v);
        memcpy((uint16_t *)p + i, &b, 2);
    }
}

// D = alpha op(A) op(B) + beta C, column-major: element (i, j) of a layout is at i + j ld.
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t desc, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t la, const void *B, cublasLtMatrixLayout_t lb, const void *beta,
                              const void *C, cublasLtMatrixLayout_t lc, void *D, cublasLtMatrixLayout_t ld,
                              const cublasLtMatmulAlgo_t *algo, void *ws, size_t ws_bytes, cudaStream_t st) {
    const emu_lt_desc *e = (const emu_lt_desc *)desc;
    const emu_lt_layout *a = (const emu_lt_layout *)la, *b = (const emu_lt_layout *)lb, *c = (const emu_lt_layout *)lc,
                        *d = (const emu_lt_layout *)ld;
    int64_t m = (int64_t)d->rows, n = (int64_t)d->cols;
    int64_t k = e->ta == CUBLAS_OP_N ? (int64_t)a->cols : (int64_t)a->rows;
    int64_t am = e->ta == CUBLAS_OP_N ? (int64_t)a->rows : (int64_t)a->cols;
    int64_t bk = e->tb == CUBLAS_OP_N ? (int64_t)b->rows : (int64_t)b->cols;
    int64_t bn = e->tb == CUBLAS_OP_N ? (int64_t)b->cols : (int64_t)b->rows;
    if (am != m || bk != k || bn != n || c->rows != d->rows || c->cols != d->cols || a->batch != d->batch ||
        b->batch != d->batch || c->batch != d->batch || a->type != CUDA_R_16BF || b->type != CUDA_R_16BF)
        return CUBLAS_STATUS_INVALID_VALUE;
    float al = *(const float *)alpha, be = *(const float *)beta;
    double t0 = prof_enabled() ? omp_get_wtime() : 0.0;
    size_t ces = c->type == CUDA_R_32F ? 4 : 2, des = d->type == CUDA_R_32F ? 4 : 2;
    for (int bt = 0; bt < d->batch; bt++) {
        const void *Ab = (const uint16_t *)A + bt * a->stride, *Bb = (const uint16_t *)B + bt * b->stride;
        const void *Cb = (const char *)C + bt * c->stride * ces;
        void *Db = (char *)D + bt * d->stride * des;
        // op(A) as rows [m][k] and op(B) as columns [n][k], in fp32
        std::vector<float> ar((size_t)(m * k)), bc((size_t)(n * k));
        for (int64_t i = 0; i < m; i++)
            for (int64_t q = 0; q < k; q++)
                ar[i * k + q] = lt_load(Ab, CUDA_R_16BF, e->ta == CUBLAS_OP_N ? i + q * a->ld : q + i * a->ld);
        for (int64_t j = 0; j < n; j++)
            for (int64_t q = 0; q < k; q++)
                bc[j * k + q] = lt_load(Bb, CUDA_R_16BF, e->tb == CUBLAS_OP_N ? q + j * b->ld : j + q * b->ld);
#pragma omp parallel for schedule(static) if (m * n * k > (1 << 16))
        for (int64_t j = 0; j < n; j++)
            for (int64_t i = 0; i < m; i++) {
                const float *x = &ar[i * k], *y = &bc[j * k];
                float s = 0.0f;
                for (int64_t q = 0; q < k; q++) s += x[q] * y[q];
                float v = al * s;
                if (be != 0.0f) v += be * lt_load(Cb, c->type, i + j * c->ld);
                lt_store(Db, d->type, i + j * d->ld, v);
            }
    }
    if (t0 > 0.0) {
        prof_gemm.calls++;
        prof_gemm.secs += omp_get_wtime() - t0;
    }
    return CUBLAS_STATUS_SUCCESS;
}
}
