// formats.h: dataset records -> chat examples, as open-instruct's reformat_datasets.py does
// (shared/docs/DATA.md section 2).
//
//   codealpaca         {instruction, input, output} -> one weighted random prompt template
//   flan_v2            {inputs, targets} (Flan v2 and its CoT split) -> prompt (+"\n" rule), answer
//   superni            a task file -> up to zero_shot + few_shot examples (random sample of instances,
//                      zero-shot via the templates, few-shot with n_few_shot positive exemplars)
//   messages           {messages: [{role, content}, ...]} (Tulu chat JSONL), multi-turn
//   prompt_completion  {prompt, completion} (the older encode_with_prompt_completion_format path)
//
// Random choices (templates, SuperNI sampling) come from our counter-based Philox stream keyed by
// (template_seed, source, record): an example is the same whatever the mixture order, on every
// epoch, and after a resume. They are not Python's random draws (which depend on processing order).
#ifndef MOSFT_DATA_FORMATS_H
#define MOSFT_DATA_FORMATS_H

#include <cjson/cJSON.h>
#include <stdint.h>

#include "data/chat.h"
#include "data/records.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { FMT_CODEALPACA = 0, FMT_SUPERNI, FMT_FLAN_V2, FMT_MESSAGES, FMT_PROMPT_COMPLETION, FMT_COUNT } data_format;

int data_format_parse(const char *name, data_format *out);  // input error listing the choices
const char *data_format_name(data_format f);
record_mode data_format_record_mode(data_format f);  // superni: whole file; others: auto (JSONL/array)

// A counter-based random stream (Philox, core/rng.h): value i is a pure function of (key, i).
typedef struct {
    uint64_t key, ctr;
} data_rng;
void data_rng_init(data_rng *r, uint64_t seed, uint64_t a, uint64_t b);
uint64_t data_rng_u64(data_rng *r);
double data_rng_double(data_rng *r);                 // [0, 1), 53 bits
uint64_t data_rng_below(data_rng *r, uint64_t n);    // unbiased [0, n)
uint64_t data_hash_str(const char *s);               // FNV-1a 64 of a name

// open-instruct's 14 + 14 instruction templates (instruction_encode_templates.py).
#define N_TEMPLATES 14
int template_draw(data_rng *r, int with_input);  // weighted, as random.choices(..., weights)
const char *template_name(int with_input, int idx);
// encode_instruction_example(random_template=True) with a given template index.
void template_apply(chat_example *ex, int with_input, int idx, const char *instr, const char *input, const char *output);
// The whole encode_instruction_example: draws the template (with_input = input.strip() != "").
void format_instruction_example(chat_example *ex, data_rng *r, const char *instr, const char *input, const char *output);
// encode_few_shot_example.
void format_few_shot_example(chat_example *ex, const char *definition, const char **ex_in, const char **ex_out, int n_ex,
                             const char *input, const char *output);

// One record of codealpaca / flan_v2 / messages / prompt_completion -> one example (cleared first).
// A malformed record: MOSFT_ERR_INPUT with "<reason>" recorded (the caller adds "file:line: ").
int format_record(data_format f, const cJSON *rec, data_rng *r, chat_example *ex);

// SuperNI.
typedef struct {
    int zero_shot, few_shot, n_few_shot;  // open-instruct: 60, 20, 2
} superni_opts;
// Task name of a task file path: basename without ".json" / ".json.gz" / ".gz".
void superni_task_name(const char *path, char *out, size_t n);
// All examples of one task, in order: zero-shot first, then few-shot. *out is an array of *n
// examples (free each, then the array). Malformed instances are skipped; *n_bad counts them and
// the first reason is written to bad_reason (may be NULL). A task without Definition or Instances
// is an input error.
int superni_task_examples(const cJSON *task, const superni_opts *o, data_rng *r, chat_example **out, int *n,
                          int *n_bad, char *bad_reason, size_t bad_reason_n);

// A set of names read from a split file (one per line; blank lines and '#' comments ignored).
typedef struct {
    char **names;  // sorted
    int n;
} name_set;
int name_set_load(name_set *s, const char *path, const source_http_opts *http);
int name_set_has(const name_set *s, const char *name);
void name_set_free(name_set *s);

#ifdef __cplusplus
}
#endif
#endif
