// cmd_data.c: `mosft data`: formatted examples with the loss mask made visible and data statistics;
// `mosft data encode`: one JSON line of input_ids and labels per example (for tests and tools).
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/common.h"
#include "core/data_glue.h"
#include "data/dataset.h"

static const char *k_usage =
    "usage: mosft data CONFIG.json [--show N] [--max-examples N] [--set key=value ...]\n"
    "       mosft data encode --tokenizer PATH --format FORMAT [options] FILE|URL\n"
    "\n"
    "The first form reads one pass over every source of the config, shows N formatted examples (default\n"
    "3) with the loss mask made visible, then statistics: records, examples, what was dropped and why,\n"
    "truncation, tokens per example, the supervised share. --max-examples N stops each source after N.\n"
    "\n"
    "encode writes {\"input_ids\": [...], \"labels\": [...]} per example (labels -100 = no loss) on stdout.\n"
    "  --format codealpaca|superni|flan_v2|messages|prompt_completion\n"
    "  --max-seq-len N (default 2048)    --eos-text TEXT (default: eos_token of tokenizer_config.json)\n"
    "  --template-seed N (default 42)    --on-bad-record skip|fail (default skip)\n"
    "  superni: --zero-shot N (60) --few-shot N (20) --n-few-shot N (2) --tasks FILE --exclude-tasks FILE\n"
    "\n"
    "Exit codes: 0 ok, 1 runtime failure, 2 bad input (config, file, record, URL, argument).\n";

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "error: mosft data: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nhint: mosft data --help\n");
    return MOSFT_ERR_INPUT;
}

static int parse_int_arg(const char *flag, const char *v, long long lo, long long *out) {
    char *end;
    long long x = strtoll(v ? v : "", &end, 10);
    if (!v || !*v || *end || x < lo) {
        fprintf(stderr, "error: mosft data: %s: expected an integer >= %lld, got \"%s\"\n", flag, lo, v ? v : "");
        return MOSFT_ERR_INPUT;
    }
    *out = x;
    return MOSFT_OK;
}

// ---- mosft data encode ------------------------------------------------------------------------

typedef struct {
    mosft_buf out;
    int64_t written;
} encode_ctx;

static void put_ints(mosft_buf *b, const int32_t *v, int n) {
    buf_append(b, "[", 1);
    for (int i = 0; i < n; i++) {
        char tmp[16];
        int k = snprintf(tmp, sizeof tmp, i ? ",%d" : "%d", v[i]);
        buf_append(b, tmp, (size_t)k);
    }
    buf_append(b, "]", 1);
}

static int encode_cb(void *ctx, int source, const dataset_item *item, const chat_tokens *t) {
    (void)source;
    (void)item;
    encode_ctx *c = ctx;
    if (!t) return 0;
    buf_append_str(&c->out, "{\"input_ids\": ");
    put_ints(&c->out, t->ids, t->n);
    buf_append_str(&c->out, ", \"labels\": ");
    put_ints(&c->out, t->labels, t->n);
    buf_append_str(&c->out, "}\n");
    c->written++;
    if (c->out.len > (1 << 20)) {
        fwrite(c->out.data, 1, c->out.len, stdout);
        c->out.len = 0;
    }
    return 0;
}

static int cmd_data_encode(int argc, char **argv) {
    const char *tok_path = NULL, *format = NULL, *eos = NULL, *input = NULL, *tasks = NULL, *excl = NULL;
    const char *on_bad = "skip";
    long long max_len = 2048, seed = 42, zs = 60, fs = 20, nfs = 2;
    int rc;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--tokenizer") && v) tok_path = argv[++i];
        else if (!strcmp(a, "--format") && v) format = argv[++i];
        else if (!strcmp(a, "--eos-text") && v) eos = argv[++i];
        else if (!strcmp(a, "--tasks") && v) tasks = argv[++i];
        else if (!strcmp(a, "--exclude-tasks") && v) excl = argv[++i];
        else if (!strcmp(a, "--on-bad-record") && v) on_bad = argv[++i];
        else if (!strcmp(a, "--max-seq-len")) { if ((rc = parse_int_arg(a, argv[++i], 2, &max_len))) return rc; }
        else if (!strcmp(a, "--template-seed")) { if ((rc = parse_int_arg(a, argv[++i], 0, &seed))) return rc; }
        else if (!strcmp(a, "--zero-shot")) { if ((rc = parse_int_arg(a, argv[++i], 0, &zs))) return rc; }
        else if (!strcmp(a, "--few-shot")) { if ((rc = parse_int_arg(a, argv[++i], 0, &fs))) return rc; }
        else if (!strcmp(a, "--n-few-shot")) { if ((rc = parse_int_arg(a, argv[++i], 0, &nfs))) return rc; }
        else if (a[0] == '-' && a[1]) return usage_error("unknown or incomplete option \"%s\"", a);
        else if (input) return usage_error("expected one FILE|URL, got a second: \"%s\"", a);
        else input = a;
    }
    if (!tok_path) return usage_error("encode: expected --tokenizer PATH%s", "");
    if (!format) return usage_error("encode: expected --format FORMAT%s", "");
    if (!input) return usage_error("encode: expected a FILE or URL to read%s", "");
    if (strcmp(on_bad, "skip") && strcmp(on_bad, "fail"))
        return usage_error("--on-bad-record: expected skip or fail, got \"%s\"", on_bad);
    tokenizer *tok;
    if ((rc = tokenizer_load(&tok, tok_path)) != MOSFT_OK) return cli_fail(rc);
    char *eos_text = eos ? xstrdup(eos) : tokenizer_config_eos_text(tok_path);
    if (!eos_text) {
        tokenizer_free(tok);
        fprintf(stderr, "error: %s: expected an eos_token in the tokenizer_config.json beside it, got none\n"
                        "hint: pass --eos-text (\"</s>\" for Llama 2, \"<|end_of_text|>\" for Llama 3)\n", tok_path);
        return MOSFT_ERR_INPUT;
    }
    data_source_spec spec = {input, format, 1.0, 0, tasks, excl, (int)zs, (int)fs, (int)nfs};
    data_options o;
    data_options_default(&o);
    o.sources = &spec;
    o.n_sources = 1;
    o.eos_text = eos_text;
    o.max_seq_len = (int)max_len;
    o.template_seed = (uint64_t)seed;
    o.skip_bad_records = !strcmp(on_bad, "skip");
    data_stats st;
    data_stats_init(&st, o.max_seq_len);
    encode_ctx c = {{0}, 0};
    rc = data_scan(&o, tok, 0, encode_cb, &c, &st);
    if (c.out.len) fwrite(c.out.data, 1, c.out.len, stdout);
    fflush(stdout);
    if (rc == MOSFT_OK)
        fprintf(stderr, "encode: %lld examples written, %lld dropped (nothing to train on), %lld bad records skipped\n",
                (long long)c.written, (long long)st.dropped_empty, (long long)st.bad_records);
    buf_free(&c.out);
    data_stats_free(&st);
    free(eos_text);
    tokenizer_free(tok);
    return cli_fail(rc);
}

// ---- mosft data CONFIG --show N ---------------------------------------------------------------

typedef struct {
    tokenizer *tok;
    const data_options *o;
    int n_show, shown, color;
    int *per_source_quota;  // examples still to show per source
} show_ctx;

// Print ids[0:n] with masked spans marked: dim in a terminal, [[...]] otherwise. Span texts come
// from decoding growing prefixes, so tokens that merge across a boundary still read right.
static void print_masked(const show_ctx *c, const chat_tokens *t) {
    int i = 0;
    char *prev = xstrdup("");
    while (i < t->n) {
        int masked = t->labels[i] == -100, j = i;
        while (j < t->n && (t->labels[j] == -100) == masked) j++;
        char *upto = tokenizer_decode(c->tok, t->ids, (size_t)j, 0);
        size_t pl = strlen(prev);
        const char *span = !strncmp(upto, prev, pl) ? upto + pl : upto;
        if (masked) printf(c->color ? "\033[2m%s\033[0m" : "[[%s]]", span);
        else printf(c->color ? "\033[1;32m%s\033[0m" : "%s", span);
        free(prev);
        prev = upto;
        i = j;
    }
    free(prev);
    printf("\n");
}

static int show_cb(void *ctx, int source, const dataset_item *item, const chat_tokens *t) {
    show_ctx *c = ctx;
    if (c->per_source_quota[source] <= 0) return 0;
    if (c->shown == 0)
        printf("=== %d examples (%s) ===\n\n", c->n_show,
               c->color ? "dim: masked, no loss; green: trained" : "[[...]]: masked, no loss; the rest is trained");
    c->per_source_quota[source]--;
    c->shown++;
    printf("--- example %d: source %d (%s), %s:%lld", c->shown, source, c->o->sources[source].format, item->file,
           (long long)item->line);
    if (item->ex->template_name) printf(", template %s", item->ex->template_name);
    if (!t) {
        printf(" ---\n(dropped: nothing to train on within max_seq_len %d)\n\n", c->o->max_seq_len);
        return 0;
    }
    printf(", %d tokens%s, %d trained ---\n", t->n, t->truncated ? " (truncated)" : "", t->n_supervised);
    print_masked(c, t);
    printf("\n");
    return 0;
}

static void fmt_pct(char *out, size_t n, int64_t a, int64_t b) { snprintf(out, n, "%.1f%%", b ? 100.0 * (double)a / (double)b : 0.0); }

static void print_stats(const data_options *o, const data_stats *per, const data_stats *all) {
    char a[32], b[32], c[32], d[32];
    printf("=== statistics (one pass, max_seq_len %d) ===\n", o->max_seq_len);
    for (int s = 0; s < o->n_sources; s++) {
        const data_stats *p = &per[s];
        mosft_fmt_count(a, sizeof a, (double)p->records);
        mosft_fmt_count(b, sizeof b, (double)p->examples);
        mosft_fmt_count(c, sizeof c, (double)p->kept);
        printf("source %d  %-17s %s\n          %s records, %s examples, %s kept, %lld dropped, %lld bad\n", s,
               o->sources[s].format, o->sources[s].path, a, b, c, (long long)p->dropped_empty, (long long)p->bad_records);
    }
    mosft_fmt_count(a, sizeof a, (double)all->records);
    printf("records            %s\n", a);
    mosft_fmt_count(a, sizeof a, (double)all->examples);
    printf("examples           %s\n", a);
    mosft_fmt_count(a, sizeof a, (double)all->kept);
    printf("kept               %s\n", a);
    printf("dropped            %lld: nothing to train on (no assistant turn, or the prompt fills max_seq_len)\n",
           (long long)all->dropped_empty);
    printf("bad records        %lld skipped", (long long)all->bad_records);
    if (all->bad_instances) printf(", %lld SuperNI instances without input/output", (long long)all->bad_instances);
    printf("\n");
    for (int i = 0; i < all->n_bad_first; i++) printf("                   %s\n", all->bad_first[i]);
    if (all->tasks_skipped) printf("tasks skipped      %lld (split lists, _mmmlu_, duplicates)\n", (long long)all->tasks_skipped);
    fmt_pct(a, sizeof a, all->truncated, all->kept);
    printf("truncated          %s of kept (%lld longer than %d tokens)\n", a, (long long)all->truncated, o->max_seq_len);
    printf("tokens/example     mean %.1f, p50 %lld, p95 %lld, max %lld\n",
           all->kept ? (double)all->tokens / (double)all->kept : 0.0, (long long)data_stats_percentile(all, 0.5),
           (long long)data_stats_percentile(all, 0.95), (long long)all->max_len);
    fmt_pct(a, sizeof a, all->supervised, all->tokens);
    mosft_fmt_count(b, sizeof b, (double)all->tokens);
    mosft_fmt_count(d, sizeof d, (double)all->supervised);
    printf("supervised         %s of tokens (%s of %s)\n", a, d, b);
}

int cmd_data(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "encode")) {
        if (cli_wants_help(argc, argv)) {
            fputs(k_usage, stdout);
            return 0;
        }
        return cmd_data_encode(argc, argv);
    }
    if (cli_wants_help(argc, argv)) {
        fputs(k_usage, stdout);
        return 0;
    }
    const char *cfg_path = NULL;
    long long show = 3, max_ex = 0;
    char **sets = xcalloc((size_t)argc, sizeof(char *));
    int n_sets = 0, rc;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--show")) {
            if ((rc = parse_int_arg(a, i + 1 < argc ? argv[++i] : NULL, 0, &show))) goto out;
        } else if (!strcmp(a, "--max-examples")) {
            if ((rc = parse_int_arg(a, i + 1 < argc ? argv[++i] : NULL, 0, &max_ex))) goto out;
        } else if (!strcmp(a, "--set") && i + 1 < argc) {
            sets[n_sets++] = argv[++i];
        } else if (a[0] == '-') {
            rc = usage_error("unknown or incomplete option \"%s\"", a);
            goto out;
        } else if (cfg_path) {
            rc = usage_error("expected one CONFIG.json, got a second: \"%s\"", a);
            goto out;
        } else {
            cfg_path = a;
        }
    }
    if (!cfg_path) {
        rc = usage_error("expected CONFIG.json%s", "");
        goto out;
    }
    mosft_config cfg;
    if ((rc = cli_load_config(&cfg, cfg_path, sets, n_sets)) != MOSFT_OK) {
        rc = cli_fail(rc);
        goto out;
    }
    if (cfg.data.n_sources == 0) {
        config_free(&cfg);
        fprintf(stderr, "error: %s: data.sources: expected at least one source, got none\n", cfg_path);
        rc = MOSFT_ERR_INPUT;
        goto out;
    }
    data_setup ds;
    if ((rc = data_setup_init(&ds, &cfg)) != MOSFT_OK) {
        config_free(&cfg);
        rc = cli_fail(rc);
        goto out;
    }
    int n_src = ds.opts.n_sources;
    show_ctx sc = {ds.tok, &ds.opts, (int)show, 0, isatty(1), xcalloc((size_t)n_src, sizeof(int))};
    for (int s = 0; s < n_src; s++) sc.per_source_quota[s] = (int)show / n_src + (s < (int)show % n_src);
    data_stats *per = xcalloc((size_t)n_src, sizeof *per), all;
    for (int s = 0; s < n_src; s++) data_stats_init(&per[s], ds.opts.max_seq_len);
    data_stats_init(&all, ds.opts.max_seq_len);
    rc = data_scan(&ds.opts, ds.tok, max_ex, show_cb, &sc, per);
    if (rc == MOSFT_OK) {
        for (int s = 0; s < n_src; s++) data_stats_merge(&all, &per[s]);
        print_stats(&ds.opts, per, &all);
    }
    for (int s = 0; s < n_src; s++) data_stats_free(&per[s]);
    free(per);
    data_stats_free(&all);
    free(sc.per_source_quota);
    data_setup_free(&ds);
    config_free(&cfg);
    rc = cli_fail(rc);
out:
    free(sets);
    return rc;
}
