// nf4.c: NF4 quantization, CPU reference (see nf4.h).
#include "core/nf4.h"

#include "core/common.h"

const float k_nf4_code[16] = {-1.0f,
                              -0.6961928009986877f,
                              -0.5250730514526367f,
                              -0.39491748809814453f,
                              -0.28444138169288635f,
                              -0.18477343022823334f,
                              -0.09105003625154495f,
                              0.0f,
                              0.07958029955625534f,
                              0.16093020141124725f,
                              0.24611230194568634f,
                              0.33791524171829224f,
                              0.44070982933044434f,
                              0.5626170039176941f,
                              0.7229568362236023f,
                              1.0f};

double nf4_storage_bytes(int64_t numel, int double_quant) {
    int64_t blocks = (numel + NF4_BLOCK - 1) / NF4_BLOCK;
    double bytes = (double)((numel + 1) / 2);
    if (double_quant)
        bytes += (double)blocks + 4.0 * (double)((blocks + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK) + 4.0 + 1024.0;
    else
        bytes += 4.0 * (double)blocks;
    return bytes;
}
