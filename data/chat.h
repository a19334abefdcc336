// chat.h: chat examples and their encoding exactly as open-instruct's finetune.py
// (encode_with_messages_format / encode_with_prompt_completion_format; shared/docs/DATA.md sec. 3).
//
// Text: system -> "<|system|>\n" + strip(content) + "\n", user -> "<|user|>\n" + strip(content) + "\n",
// assistant -> "<|assistant|>\n" + strip(content) + EOS_TEXT + "\n"; the whole string is stripped
// (Python str.strip: Unicode whitespace) and tokenized ONCE with BOS (the tokenizer's post-processor);
// EOS is text ("</s>" is an added token of Llama 2, "<|end_of_text|>" of Llama 3).
// Labels = input_ids with -100 outside assistant content + EOS (and the "\n" after a non-final EOS).
// Mask boundaries are token counts of prefixes of the text, tokenized the same way, so they agree with
// Hugging Face's even where a boundary falls inside a merge. Truncation keeps the first max_seq_len
// tokens. An example whose labels are all -100 has nothing to train on: the caller drops it.
#ifndef MOSFT_DATA_CHAT_H
#define MOSFT_DATA_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "core/common.h"
#include "data/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { ROLE_SYSTEM = 0, ROLE_USER, ROLE_ASSISTANT } chat_role;

typedef struct {
    chat_role role;
    char *text;  // owned, NUL-terminated
    size_t len;
} chat_msg;

typedef struct {
    chat_msg *msgs;
    int n, cap;
    int prompt_completion;      // 1: msgs[0] = prompt, msgs[1] = completion (the older path)
    const char *template_name;  // static: the prompt template drawn ("w_input[3]"), or NULL
} chat_example;

void chat_example_clear(chat_example *ex);  // keeps the allocation for reuse
void chat_example_free(chat_example *ex);
void chat_example_add(chat_example *ex, chat_role role, const char *text, size_t len);
const char *chat_role_name(chat_role r);

// Python's str.strip(): [*a, *b) is s[0:n] without leading/trailing Unicode whitespace.
void py_strip(const char *s, size_t n, size_t *a, size_t *b);
int py_isspace_cp(uint32_t cp);

// The template text of an example (what gets tokenized), appended to `out`.
void chat_render(const chat_example *ex, const char *eos_text, mosft_buf *out);

// One encoded example: input_ids and labels, n tokens each.
typedef struct {
    int32_t *ids;     // (n)
    int32_t *labels;  // (n) -100 = no loss
    int n, cap;
    int truncated;     // the text had more than max_seq_len tokens
    int n_supervised;  // labels != -100
} chat_tokens;
void chat_tokens_free(chat_tokens *t);

typedef struct {
    tokenizer *tok;
    char *eos_text;
    int max_seq_len;
    mosft_buf text;   // scratch: the rendered text
    tok_ids scratch;  // scratch: prefix tokenizations
    tok_ids full;
    size_t *offs;     // scratch: byte offset where message i starts in the unstripped text
    int offs_cap;
} chat_encoder;

void chat_encoder_init(chat_encoder *e, tokenizer *tok, const char *eos_text, int max_seq_len);
void chat_encoder_free(chat_encoder *e);
// Encode `ex` into `out` (overwritten). Returns MOSFT_OK; out->n_supervised == 0 means "drop".
int chat_encode(chat_encoder *e, const chat_example *ex, chat_tokens *out);

#ifdef __cplusplus
}
#endif
#endif
