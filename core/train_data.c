// train_data.c: the configured data as the training loop's train_data (placeholder until the
// batcher lands, issue 4).
#include "core/train.h"

int train_data_open(train_data **out, const mosft_config *cfg, int *pad_id) {
    (void)cfg;
    (void)pad_id;
    *out = NULL;
    return mosft_fail(MOSFT_ERR_RUNTIME, "data pipeline: not implemented yet (issue 4)");
}
