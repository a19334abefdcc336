// data_glue.h: from the run configuration (core/config.h) to the data layer's options
// (data/dataset.h), which knows nothing of configs; and the tokenizer with its chat EOS text.
#ifndef MOSFT_DATA_GLUE_H
#define MOSFT_DATA_GLUE_H

#include "core/config.h"
#include "data/batcher.h"
#include "data/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    data_options opts;                       // points into specs and eos_text below
    data_source_spec specs[CFG_MAX_SOURCES];
    char *tokenizer_path;                    // resolved: tokenizer.path or <model.path>/tokenizer.json
    char *eos_text;                          // tokenizer.eos_text, or eos_token of tokenizer_config.json
    tokenizer *tok;                          // loaded (owned)
} data_setup;

// Resolve and load the tokenizer, find the EOS text, fill the options (micro_batch_size from
// train.micro_batch_size; pad id = the tokenizer's pad, else its EOS, else 0). Input errors name the
// config key (no tokenizer path, no eos_token anywhere).
int data_setup_init(data_setup *s, const mosft_config *c);
void data_setup_free(data_setup *s);

#ifdef __cplusplus
}
#endif
#endif
