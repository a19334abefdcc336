// cmd_tokenize.c: `mosft tokenize`: encode or decode with a tokenizer.json (a debugging aid, and how tests
// and scripts drive the tokenizer in bulk).
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/common.h"
#include "core/fileio.h"
#include "data/tokenizer.h"

static const char *k_help =
    "usage: mosft tokenize --tokenizer PATH [options] [TEXT...]\n"
    "\n"
    "Encode text to token ids (or decode ids to text) with a Hugging Face tokenizer.json, giving exactly the\n"
    "ids of HF tokenizers. Supported: BPE tokenizers such as Llama 2 and Llama 3.\n"
    "\n"
    "  --tokenizer PATH  tokenizer.json, or a folder holding one (required)\n"
    "  --no-special      no special tokens from the post-processor (no BOS): HF add_special_tokens=False.\n"
    "                    Added tokens written in the text (\"</s>\") are still matched, as in HF.\n"
    "  --jsonl           read JSON lines from stdin: {\"text\": ...} -> {\"ids\": [...]} on stdout, one per line\n"
    "                    (with --decode: {\"ids\": [...]} -> {\"text\": ...})\n"
    "  --decode          decode: the arguments are ids (\"1 15043 3186\", commas and brackets allowed)\n"
    "  --skip-special    with --decode: leave out special tokens (what HF Python's decode does by default)\n"
    "  --bench FILE      time encoding the {\"text\": ...} lines of FILE, one thread, document by document,\n"
    "                    with special tokens unless --no-special: MB/s and tokens/s\n"
    "  --repeat N        with --bench: encode the file N times (default 1)\n"
    "  --info            vocabulary size, BOS/EOS/PAD ids\n"
    "\n"
    "examples:\n"
    "  mosft tokenize --tokenizer models/llama2 \"Hello world\"       # ids and tokens, with BOS\n"
    "  echo '{\"text\": \"Hello\"}' | mosft tokenize --tokenizer tok.json --jsonl --no-special\n"
    "  mosft tokenize --tokenizer tok.json --decode 1 15043 3186\n"
    "\n"
    "Exit codes: 0 ok, 1 runtime failure, 2 bad input (arguments, tokenizer file, JSON line).\n";

static int usage_error(const char *msg, const char *arg) {
    fprintf(stderr, "error: tokenize: %s%s%s\nhint: `mosft tokenize --help` shows the options\n", msg, arg ? " " : "",
            arg ? arg : "");
    return 2;
}

// A JSON string literal of s[0..n) (UTF-8 passes through; control characters, quote, backslash escaped).
static void json_quote(mosft_buf *b, const char *s, size_t n) {
    buf_append(b, "\"", 1);
    size_t a = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        buf_append(b, s + a, i - a);
        a = i + 1;
        switch (c) {
        case '"': buf_append_str(b, "\\\""); break;
        case '\\': buf_append_str(b, "\\\\"); break;
        case '\n': buf_append_str(b, "\\n"); break;
        case '\r': buf_append_str(b, "\\r"); break;
        case '\t': buf_append_str(b, "\\t"); break;
        default: buf_printf(b, "\\u%04x", c);
        }
    }
    buf_append(b, s + a, n - a);
    buf_append(b, "\"", 1);
}

static void ids_json(mosft_buf *b, const int32_t *ids, size_t n) {
    buf_append(b, "[", 1);
    for (size_t i = 0; i < n; i++) buf_printf(b, i ? ",%d" : "%d", ids[i]);
    buf_append(b, "]", 1);
}

// Parse ids from arguments like "1 2 3", "1,2,3" or "[1, 2, 3]".
static int parse_ids(int n, char **args, tok_ids *out) {
    for (int i = 0; i < n; i++) {
        const char *p = args[i];
        while (*p) {
            if (*p == ' ' || *p == ',' || *p == '[' || *p == ']' || *p == '\t' || *p == '\n') {
                p++;
                continue;
            }
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p || v < 0 || v > 2147483647L) return usage_error("--decode: expected token ids, got", args[i]);
            int32_t id = (int32_t)v;
            if (out->n == out->cap) {
                out->cap = out->cap ? out->cap * 2 : 64;
                out->ids = xrealloc(out->ids, out->cap * sizeof *out->ids);
            }
            out->ids[out->n++] = id;
            p = end;
        }
    }
    return 0;
}

static int run_text(tokenizer *t, int n, char **texts, int add_special) {
    for (int k = 0; k < n; k++) {
        tok_ids ids = {0};
        tokenizer_encode(t, texts[k], strlen(texts[k]), add_special, &ids);
        mosft_buf b = {0};
        buf_append_str(&b, "ids: ");
        ids_json(&b, ids.ids, ids.n);
        buf_printf(&b, "\ntokens (%zu):\n", ids.n);
        for (size_t i = 0; i < ids.n; i++) {
            const char *s = tokenizer_id_to_token(t, ids.ids[i]);
            buf_printf(&b, "%8d  ", ids.ids[i]);
            json_quote(&b, s ? s : "", s ? strlen(s) : 0);
            buf_append(&b, "\n", 1);
        }
        fputs(buf_cstr(&b), stdout);
        buf_free(&b);
        tok_ids_free(&ids);
    }
    return 0;
}

static int run_decode(tokenizer *t, int n, char **args, int skip_special) {
    tok_ids ids = {0};
    int rc = parse_ids(n, args, &ids);
    if (!rc) {
        char *s = tokenizer_decode(t, ids.ids, ids.n, skip_special);
        printf("%s\n", s);
        free(s);
    }
    tok_ids_free(&ids);
    return rc;
}

static int run_jsonl(tokenizer *t, int decode, int add_special, int skip_special) {
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long lineno = 0;
    mosft_buf out = {0};
    tok_ids ids = {0};
    int rc = 0;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        if (len == 0) continue;
        cJSON *j = cJSON_ParseWithLength(line, (size_t)len);
        const cJSON *v = cJSON_IsObject(j) ? cJSON_GetObjectItemCaseSensitive(j, decode ? "ids" : "text") : NULL;
        if (decode ? !cJSON_IsArray(v) : !cJSON_IsString(v)) {
            cJSON_Delete(j);
            fflush(stdout);
            fprintf(stderr, "error: stdin: line %ld: expected a JSON object with %s, got %.60s\n", lineno,
                    decode ? "\"ids\": [...]" : "\"text\": \"...\"", line);
            rc = 2;
            break;
        }
        out.len = 0;
        if (decode) {
            ids.n = 0;
            for (const cJSON *x = v->child; x; x = x->next) {
                if (ids.n == ids.cap) {
                    ids.cap = ids.cap ? ids.cap * 2 : 64;
                    ids.ids = xrealloc(ids.ids, ids.cap * sizeof *ids.ids);
                }
                ids.ids[ids.n++] = cJSON_IsNumber(x) ? (int32_t)x->valuedouble : -1;
            }
            char *s = tokenizer_decode(t, ids.ids, ids.n, skip_special);
            buf_append_str(&out, "{\"text\": ");
            json_quote(&out, s, strlen(s));
            buf_append_str(&out, "}\n");
            free(s);
        } else {
            ids.n = 0;
            tokenizer_encode(t, v->valuestring, strlen(v->valuestring), add_special, &ids);
            buf_append_str(&out, "{\"ids\": ");
            ids_json(&out, ids.ids, ids.n);
            buf_append_str(&out, "}\n");
        }
        fwrite(out.data, 1, out.len, stdout);
        cJSON_Delete(j);
    }
    free(line);
    buf_free(&out);
    tok_ids_free(&ids);
    return rc;
}

static int run_bench(tokenizer *t, const char *file, int repeat, int add_special) {
    char *text;
    size_t len;
    int rc = file_read_all(file, &text, &len);
    if (rc) return cli_fail(rc);
    // Documents: the "text" of each line, copied out so that timing sees only the tokenizer.
    char **docs = NULL;
    size_t *lens = NULL, n = 0, cap = 0, bytes = 0;
    long lineno = 0;
    for (char *p = text; p < text + len;) {
        char *e = memchr(p, '\n', (size_t)(text + len - p));
        if (!e) e = text + len;
        *e = 0;
        lineno++;
        if (e > p) {
            cJSON *j = cJSON_ParseWithLength(p, (size_t)(e - p));
            const cJSON *v = cJSON_IsObject(j) ? cJSON_GetObjectItemCaseSensitive(j, "text") : NULL;
            if (!cJSON_IsString(v)) {
                cJSON_Delete(j);
                fprintf(stderr, "error: %s: line %ld: expected a JSON object with \"text\": \"...\"\n", file, lineno);
                rc = 2;
                break;
            }
            if (n == cap) {
                cap = cap ? cap * 2 : 1024;
                docs = xrealloc(docs, cap * sizeof *docs);
                lens = xrealloc(lens, cap * sizeof *lens);
            }
            docs[n] = xstrdup(v->valuestring);
            lens[n] = strlen(docs[n]);
            bytes += lens[n];
            n++;
            cJSON_Delete(j);
        }
        p = e + 1;
    }
    free(text);
    if (!rc) {
        tok_ids ids = {0};
        size_t tokens = 0;
        uint64_t checksum = 0;
        double t0 = mosft_now();
        for (int r = 0; r < repeat; r++)
            for (size_t i = 0; i < n; i++) {
                ids.n = 0;
                tokenizer_encode(t, docs[i], lens[i], add_special, &ids);
                tokens += ids.n;
                for (size_t k = 0; k < ids.n; k++) checksum = checksum * 31 + (uint32_t)ids.ids[k];
            }
        double dt = mosft_now() - t0;
        double total = (double)bytes * repeat;
        printf("{\"docs\": %zu, \"repeat\": %d, \"bytes\": %.0f, \"tokens\": %zu, \"seconds\": %.4f, "
               "\"MB_per_s\": %.3f, \"tokens_per_s\": %.0f, \"checksum\": %llu}\n",
               n, repeat, total, tokens, dt, total / 1e6 / dt, (double)tokens / dt, (unsigned long long)checksum);
        tok_ids_free(&ids);
    }
    for (size_t i = 0; i < n; i++) free(docs[i]);
    free(docs);
    free(lens);
    return rc;
}

int cmd_tokenize(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(k_help, stdout);
        return 0;
    }
    const char *path = NULL, *bench = NULL;
    int add_special = 1, jsonl = 0, decode = 0, skip_special = 0, repeat = 1, info = 0, npos = 0;
    char **pos = xcalloc((size_t)argc + 1, sizeof *pos);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--tokenizer") || !strcmp(a, "--bench") || !strcmp(a, "--repeat")) {
            if (i + 1 >= argc) {
                free(pos);
                return usage_error("expected a value after", a);
            }
            const char *v = argv[++i];
            if (!strcmp(a, "--tokenizer")) path = v;
            else if (!strcmp(a, "--bench")) bench = v;
            else {
                char *end;
                long r = strtol(v, &end, 10);
                if (*end || r < 1 || r > 1000000) {
                    free(pos);
                    return usage_error("--repeat: expected a count >= 1, got", v);
                }
                repeat = (int)r;
            }
        } else if (!strcmp(a, "--no-special")) add_special = 0;
        else if (!strcmp(a, "--jsonl")) jsonl = 1;
        else if (!strcmp(a, "--decode")) decode = 1;
        else if (!strcmp(a, "--skip-special")) skip_special = 1;
        else if (!strcmp(a, "--info")) info = 1;
        else if (!strcmp(a, "--")) {
            while (++i < argc) pos[npos++] = argv[i];
        } else if (a[0] == '-' && a[1] == '-') {
            free(pos);
            return usage_error("unknown option", a);
        } else pos[npos++] = argv[i];
    }
    int rc = 0;
    if (!path) rc = usage_error("missing --tokenizer PATH", NULL);
    else if (!jsonl && !bench && !info && npos == 0) rc = usage_error("nothing to do: give TEXT, --jsonl, --bench or --info", NULL);
    else if ((jsonl || bench) && npos) rc = usage_error("unexpected argument with --jsonl/--bench:", pos[0]);
    if (rc) {
        free(pos);
        return rc;
    }
    tokenizer *t;
    double t0 = mosft_now();
    rc = tokenizer_load(&t, path);
    if (rc) {
        free(pos);
        return cli_fail(rc);
    }
    double load_s = mosft_now() - t0;
    if (info) {
        printf("tokenizer: %s\nvocab size: %d\nbos id: %d\neos id: %d\npad id: %d\nloaded in %.3f s\n", path,
               tokenizer_vocab_size(t), tokenizer_bos_id(t), tokenizer_eos_id(t), tokenizer_pad_id(t), load_s);
    }
    if (bench) rc = run_bench(t, bench, repeat, add_special);
    else if (jsonl) rc = run_jsonl(t, decode, add_special, skip_special);
    else if (decode) rc = run_decode(t, npos, pos, skip_special);
    else if (npos) rc = run_text(t, npos, pos, add_special);
    tokenizer_free(t);
    free(pos);
    fflush(stdout);
    return rc;
}
