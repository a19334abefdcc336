// tokenizer.h: Hugging Face tokenizer.json (BPE) in C, giving exactly the ids of HF tokenizers for Llama 2
// (SentencePiece-style BPE with byte fallback) and Llama 3 (byte-level BPE with the regex pre-tokenizer),
// and for the other components listed in data/tokenizer.c. A tokenizer.json with anything else (WordPiece,
// Unigram, an unknown normalizer, another regex) is refused at load with the JSON path of the part.
// Unicode classes follow the Unicode version of HF's regex engine (data/unicode_tables.c).
//
// One tokenizer object may be used by one thread at a time (encode keeps a cache of pre-tokens and
// reuses its working memory); decode and the lookups are read-only.
#ifndef MOSFT_TOKENIZER_H
#define MOSFT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tokenizer tokenizer;

// Load a tokenizer.json (or a folder holding one). Returns MOSFT_OK, or MOSFT_ERR_INPUT naming the
// file and the JSON path of what is malformed or unsupported (WordPiece, Unigram, an unknown normalizer).
int tokenizer_load(tokenizer **out, const char *path);
void tokenizer_free(tokenizer *t);

// A growable vector of token ids.
typedef struct {
    int32_t *ids;
    size_t n, cap;
} tok_ids;
void tok_ids_free(tok_ids *v);

// Encode `len` bytes of UTF-8 text, APPENDING the ids to `out`, exactly as HF tokenizers'
// encode(text, add_special_tokens=add_special).ids: add_special = 1 applies the post-processor (Llama: BOS
// first). Added tokens written in the text are matched either way ("</s>" -> 2 for Llama 2, HF's default;
// see tokenizer_set_split_special). Ill-formed UTF-8 is read as U+FFFD, as Python's
// bytes.decode(errors="replace") would. Returns MOSFT_OK.
int tokenizer_encode(tokenizer *t, const char *text, size_t len, int add_special, tok_ids *out);
// Decode ids to a malloc'd UTF-8 string (HF decode; skip_special drops special added tokens).
char *tokenizer_decode(const tokenizer *t, const int32_t *ids, size_t n, int skip_special);

int32_t tokenizer_token_to_id(const tokenizer *t, const char *token);  // -1 if unknown
const char *tokenizer_id_to_token(const tokenizer *t, int32_t id);     // NULL if out of range
int32_t tokenizer_bos_id(const tokenizer *t);                          // -1 if none
int32_t tokenizer_eos_id(const tokenizer *t);                          // -1 if none
int32_t tokenizer_pad_id(const tokenizer *t);                          // -1 if none
int tokenizer_vocab_size(const tokenizer *t);                          // including added tokens
int tokenizer_is_special(const tokenizer *t, int32_t id);              // a special added token?

// on = 1 (the default, HF's encode_special_tokens=False): special added tokens written in the text become
// their ids. on = 0: they are tokenized as plain text (HF's encode_special_tokens=True).
void tokenizer_set_split_special(tokenizer *t, int on);

// The EOS *text* of the chat template: eos_token of the tokenizer_config.json beside `tokenizer_path`
// (a string or {"content": ...}); NULL if there is none. malloc'd.
char *tokenizer_config_eos_text(const char *tokenizer_path);

#ifdef __cplusplus
}
#endif
#endif
