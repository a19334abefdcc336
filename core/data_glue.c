// data_glue.c: mosft_config -> data_options (see data_glue.h).
#include "core/data_glue.h"

#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/fileio.h"

int data_setup_init(data_setup *s, const mosft_config *c) {
    memset(s, 0, sizeof *s);
    const char *tp = c->tokenizer.path;
    if (tp && *tp) s->tokenizer_path = xstrdup(tp);
    else if (c->model.path && *c->model.path) s->tokenizer_path = path_join(c->model.path, "tokenizer.json");
    else
        return mosft_fail_hint(MOSFT_ERR_INPUT, "set tokenizer.path (a tokenizer.json) or model.path",
                               "%s: tokenizer.path: expected a tokenizer.json, got none (and no model.path)",
                               c->source_path && *c->source_path ? c->source_path : "config");
    int rc = tokenizer_load(&s->tok, s->tokenizer_path);
    if (rc != MOSFT_OK) {
        data_setup_free(s);
        return rc;
    }
    if (c->tokenizer.eos_text && *c->tokenizer.eos_text) s->eos_text = xstrdup(c->tokenizer.eos_text);
    else s->eos_text = tokenizer_config_eos_text(s->tokenizer_path);
    if (!s->eos_text) {
        rc = mosft_fail_hint(MOSFT_ERR_INPUT, "set tokenizer.eos_text (\"</s>\" for Llama 2, \"<|end_of_text|>\" for Llama 3)",
                             "%s: expected an eos_token in the tokenizer_config.json beside it, got none",
                             s->tokenizer_path);
        data_setup_free(s);
        return rc;
    }
    data_options *o = &s->opts;
    data_options_default(o);
    for (int i = 0; i < c->data.n_sources; i++) {
        const cfg_source *src = &c->data.sources[i];
        s->specs[i] = (data_source_spec){src->path,      src->format,        src->weight,
                                         src->max_records, src->tasks,       src->exclude_tasks,
                                         src->zero_shot_per_task, src->few_shot_per_task, src->n_few_shot};
    }
    o->sources = s->specs;
    o->n_sources = c->data.n_sources;
    o->eos_text = s->eos_text;
    o->max_seq_len = c->data.max_seq_len;
    o->micro_batch_size = c->train.micro_batch_size;
    int32_t pad = tokenizer_pad_id(s->tok);
    if (pad < 0) pad = tokenizer_eos_id(s->tok);
    o->pad_id = pad >= 0 ? pad : 0;
    o->eval_examples = c->data.eval_examples;
    o->shuffle_buffer = c->data.shuffle_buffer;
    o->epochs = c->data.epochs;
    o->group_by_length = c->data.group_by_length;
    o->skip_bad_records = !strcmp(c->data.on_bad_record, "skip");
    o->seed = c->data.seed;
    o->template_seed = c->data.template_seed;
    o->prefetch = c->data.prefetch;
    o->http.connect_timeout_s = c->data.http_connect_timeout;
    o->http.stall_timeout_s = c->data.http_read_timeout;
    o->http.max_retries = c->data.http_retries;
    return MOSFT_OK;
}

void data_setup_free(data_setup *s) {
    tokenizer_free(s->tok);
    free(s->tokenizer_path);
    free(s->eos_text);
    memset(s, 0, sizeof *s);
}
