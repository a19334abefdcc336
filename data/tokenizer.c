// tokenizer.c: placeholder until the tokenizer lands (issue 3).
#include "data/tokenizer.h"

#include "core/common.h"

int tokenizer_load(tokenizer **out, const char *path) {
    *out = NULL;
    return mosft_fail(MOSFT_ERR_RUNTIME, "%s: tokenizer: not implemented yet (issue 3)", path);
}
void tokenizer_free(tokenizer *t) { (void)t; }
int tokenizer_vocab_size(const tokenizer *t) { (void)t; return 0; }
int32_t tokenizer_bos_id(const tokenizer *t) { (void)t; return -1; }
int32_t tokenizer_eos_id(const tokenizer *t) { (void)t; return -1; }
