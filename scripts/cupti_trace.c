// cupti_trace.c: a timeline of every kernel, copy and memset of a CUDA program, for finding where the GPU
// waits (the GPU machine has ncu but not nsys). Loaded by the CUDA driver through its injection hook; the
// program itself is unchanged:
//
//   make build/lib/libmosft_trace.so
//   CUDA_INJECTION64_PATH=$PWD/build/lib/libmosft_trace.so MOSFT_TRACE_OUT=trace.txt \
//       build/mosft bench --model llama2-7b --steps 3 --warmup 1
//   python3 scripts/trace_gaps.py trace.txt
//
// One line a record, times in ns on the GPU's clock:
//   K start end stream correlation name     a kernel
//   M start end stream correlation what     a copy (memcpyN, N the CUpti_ActivityMemcpyKind) or a memset
//   A start end correlation r|dCBID          a runtime / driver API call (only with MOSFT_TRACE_API=1:
//                                            each call then costs ~1 us more on the host)
// The correlation id ties a kernel to the API call that launched it (how far the host runs ahead).
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#define TRACE_BUFFER (8u << 20)

static FILE *g_out;

static void CUPTIAPI buffer_requested(uint8_t **buf, size_t *size, size_t *max_records) {
    *buf = aligned_alloc(8, TRACE_BUFFER);
    *size = *buf ? TRACE_BUFFER : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid) {
    CUpti_Activity *r = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        switch (r->kind) {
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)r;
            fprintf(g_out, "K %llu %llu %u %u %s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                    k->streamId, k->correlationId, k->name);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)r;
            fprintf(g_out, "M %llu %llu %u %u memcpy%d\n", (unsigned long long)m->start, (unsigned long long)m->end,
                    m->streamId, m->correlationId, (int)m->copyKind);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)r;
            fprintf(g_out, "M %llu %llu %u %u memset\n", (unsigned long long)m->start, (unsigned long long)m->end,
                    m->streamId, m->correlationId);
            break;
        }
        case CUPTI_ACTIVITY_KIND_RUNTIME:
        case CUPTI_ACTIVITY_KIND_DRIVER: {
            const CUpti_ActivityAPI *a = (const CUpti_ActivityAPI *)r;
            fprintf(g_out, "A %llu %llu %u %c%u\n", (unsigned long long)a->start, (unsigned long long)a->end,
                    a->correlationId, r->kind == CUPTI_ACTIVITY_KIND_RUNTIME ? 'r' : 'd', (unsigned)a->cbid);
            break;
        }
        default:
            break;
        }
    }
    free(buf);
}

static void trace_close(void) {
    cuptiActivityFlushAll(1);
    fclose(g_out);
}

// Called by the CUDA driver when it initializes (CUDA_INJECTION64_PATH).
int InitializeInjection(void) {
    const char *path = getenv("MOSFT_TRACE_OUT") ? getenv("MOSFT_TRACE_OUT") : "trace.txt";
    if (!(g_out = fopen(path, "w"))) {
        fprintf(stderr, "cupti_trace: cannot write %s\n", path);
        return 0;
    }
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
        fprintf(stderr, "cupti_trace: CUPTI refused the activity callbacks (another profiler attached?)\n");
        return 0;
    }
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    if (getenv("MOSFT_TRACE_API")) {
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME);
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
    }
    atexit(trace_close);
    return 1;
}
