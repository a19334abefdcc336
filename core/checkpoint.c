// checkpoint.c: see checkpoint.h.
#include "core/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "core/safetensors.h"
#include "core/version.h"

// Fault injection for the crash tests: MOSFT_TEST_KILL_AT=<point>:<step> kills the process with
// SIGKILL at that point of checkpoint <step> (points: "state" after adapter.mos is written into the
// temporary folder, "rename" just before the folder is renamed, "latest" before RUN_DIR/adapter.mos).
static void maybe_die(const char *point, int64_t step) {
    const char *e = getenv("MOSFT_TEST_KILL_AT");
    if (!e) return;
    char want[64];
    snprintf(want, sizeof want, "%s:%lld", point, (long long)step);
    if (!strcmp(e, want)) {
        fflush(NULL);
        raise(SIGKILL);
    }
}

static int parse_ckpt_name(const char *name, int64_t *step) {
    long long s;
    int n = 0;
    if (sscanf(name, "checkpoint-%lld%n", &s, &n) != 1 || name[n] != 0 || s < 0) return 0;
    *step = s;
    return 1;
}

static int cmp_i64_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? 1 : (x > y ? -1 : 0);
}

// Steps of the complete checkpoints of a run, newest first. Removes *.tmp leftovers when asked.
static int list_checkpoints(const char *run_dir, int64_t **steps, int *n, int clean_tmp) {
    *steps = NULL;
    *n = 0;
    DIR *d = opendir(run_dir);
    if (!d) return mosft_fail(MOSFT_ERR_INPUT, "%s: cannot open run directory: %s", run_dir, strerror(errno));
    struct dirent *e;
    int cap = 0;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l > 4 && !strcmp(e->d_name + l - 4, ".tmp") && !strncmp(e->d_name, "checkpoint-", 11)) {
            if (clean_tmp) {
                char *p = path_join(run_dir, e->d_name);
                rm_rf(p);
                free(p);
            }
            continue;
        }
        int64_t s;
        if (!parse_ckpt_name(e->d_name, &s)) continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            *steps = xrealloc(*steps, sizeof(int64_t) * (size_t)cap);
        }
        (*steps)[(*n)++] = s;
    }
    closedir(d);
    if (*n) qsort(*steps, (size_t)*n, sizeof(int64_t), cmp_i64_desc);
    return MOSFT_OK;
}

static char *ckpt_path(const char *run_dir, int64_t step, const char *suffix) {
    char name[64];
    snprintf(name, sizeof name, "checkpoint-%06lld%s", (long long)step, suffix);
    return path_join(run_dir, name);
}

static int write_state(const char *path, size_t n_params, const float *m, const float *v, const void *cursor,
                       size_t cursor_len, const trainer_meta *meta) {
    st_writer *w = st_writer_new();
    int64_t np[1] = {(int64_t)n_params}, nc[1] = {(int64_t)cursor_len};
    st_writer_add(w, "adamw.m", MOSFT_F32, 1, np, m);
    st_writer_add(w, "adamw.v", MOSFT_F32, 1, np, v);
    st_writer_add(w, "data.cursor", MOSFT_U8, 1, nc, cursor);
    char buf[64];
    st_writer_meta(w, "format", "mosft-trainer-state");
    snprintf(buf, sizeof buf, "%d", MOSFT_STATE_FORMAT_VERSION);
    st_writer_meta(w, "format_version", buf);
    snprintf(buf, sizeof buf, "%lld", (long long)meta->step);
    st_writer_meta(w, "step", buf);
    snprintf(buf, sizeof buf, "%lld", (long long)meta->tokens_seen);
    st_writer_meta(w, "tokens_seen", buf);
    snprintf(buf, sizeof buf, "%.17g", meta->elapsed_s);
    st_writer_meta(w, "elapsed_s", buf);
    snprintf(buf, sizeof buf, "%d", meta->nonfinite_streak);
    st_writer_meta(w, "nonfinite_streak", buf);
    int rc = st_writer_write(w, path);
    st_writer_free(w);
    return rc;
}

int checkpoint_save(const char *run_dir, const adapter *ad, const float *m, const float *v, const void *cursor,
                    size_t cursor_len, const trainer_meta *meta, int keep_last) {
    char *tmp = ckpt_path(run_dir, meta->step, ".tmp");
    char *fin = ckpt_path(run_dir, meta->step, "");
    rm_rf(tmp);
    int rc = mkdir_p(tmp);
    char *ap = path_join(tmp, "adapter.mos"), *sp = path_join(tmp, "trainer_state.safetensors");
    if (!rc) rc = adapter_save(ad, ap);
    if (!rc) maybe_die("state", meta->step);
    if (!rc) rc = write_state(sp, ad->n_params, m, v, cursor, cursor_len, meta);
    if (!rc) rc = fsync_dir(tmp);
    if (!rc) maybe_die("rename", meta->step);
    if (!rc) {
        rm_rf(fin);  // a checkpoint of the same step from an earlier attempt
        if (rename(tmp, fin) != 0)
            rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: cannot rename to %s: %s", tmp, fin, strerror(errno));
    }
    if (!rc) rc = fsync_dir(run_dir);
    // The run's latest adapter, for `mosft export RUN_DIR/adapter.mos`.
    if (!rc) {
        maybe_die("latest", meta->step);
        char *latest = path_join(run_dir, "adapter.mos");
        rc = adapter_save(ad, latest);
        free(latest);
    }
    if (rc) rm_rf(tmp);
    free(ap);
    free(sp);
    free(tmp);
    free(fin);
    if (rc) return rc;
    // Keep the newest keep_last.
    int64_t *steps;
    int n;
    if (list_checkpoints(run_dir, &steps, &n, 0) == MOSFT_OK) {
        for (int i = keep_last; i < n; i++) {
            char *old = ckpt_path(run_dir, steps[i], "");
            rm_rf(old);
            free(old);
        }
        free(steps);
    }
    return MOSFT_OK;
}

int checkpoint_find_latest(const char *run_dir, char **ckpt_dir, int64_t *step) {
    *ckpt_dir = NULL;
    int64_t *steps;
    int n;
    int rc = list_checkpoints(run_dir, &steps, &n, 1);
    if (rc) return rc;
    for (int i = 0; i < n; i++) {
        char *d = ckpt_path(run_dir, steps[i], "");
        char *ap = path_join(d, "adapter.mos"), *sp = path_join(d, "trainer_state.safetensors");
        int ok = file_exists(ap) && file_exists(sp);
        free(ap);
        free(sp);
        if (ok) {
            *ckpt_dir = d;
            *step = steps[i];
            free(steps);
            return MOSFT_OK;
        }
        mosft_log("warning: %s is incomplete; skipping it\n", d);
        free(d);
    }
    free(steps);
    return mosft_fail_hint(MOSFT_ERR_INPUT, "start a new run without --resume",
                           "%s: no checkpoint-NNNNNN folder to resume from", run_dir);
}

static int meta_i64(const st_file *f, const char *key, int64_t *out) {
    const char *s = st_meta(f, key);
    char *end = NULL;
    if (!s) return mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.%s: expected an integer, got nothing", f->path, key);
    long long v = strtoll(s, &end, 10);
    if (!end || *end) return mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.%s: expected an integer, got \"%s\"", f->path, key, s);
    *out = v;
    return MOSFT_OK;
}

int checkpoint_load_state(const char *ckpt_dir, size_t n_params, float *m, float *v, mosft_buf *cursor,
                          trainer_meta *meta) {
    char *sp = path_join(ckpt_dir, "trainer_state.safetensors");
    st_file f;
    int rc = st_open(&f, sp);
    free(sp);
    if (rc) {
        st_close(&f);
        return rc;
    }
    memset(meta, 0, sizeof *meta);
    const char *fmt = st_meta(&f, "format");
    if (!fmt || strcmp(fmt, "mosft-trainer-state") != 0) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.format: expected \"mosft-trainer-state\"", f.path);
        goto done;
    }
    int64_t ver = 0, x = 0;
    if ((rc = meta_i64(&f, "format_version", &ver))) goto done;
    if (ver != MOSFT_STATE_FORMAT_VERSION) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: format_version %lld is not supported (this mosft writes %d)", f.path,
                        (long long)ver, MOSFT_STATE_FORMAT_VERSION);
        goto done;
    }
    if ((rc = meta_i64(&f, "step", &meta->step))) goto done;
    if ((rc = meta_i64(&f, "tokens_seen", &meta->tokens_seen))) goto done;
    if ((rc = meta_i64(&f, "nonfinite_streak", &x))) goto done;
    meta->nonfinite_streak = (int)x;
    const char *el = st_meta(&f, "elapsed_s");
    meta->elapsed_s = el ? strtod(el, NULL) : 0;
    int64_t np[1] = {(int64_t)n_params};
    const st_tensor *tm = st_find(&f, "adamw.m"), *tv = st_find(&f, "adamw.v"), *tc = st_find(&f, "data.cursor");
    if (!tm || !tv || !tc) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: expected tensors adamw.m, adamw.v and data.cursor", f.path);
        goto done;
    }
    if ((rc = st_expect(&f, tm, MOSFT_F32, 1, np)) || (rc = st_expect(&f, tv, MOSFT_F32, 1, np))) goto done;
    if (tc->dtype != MOSFT_U8 || tc->ndim != 1) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: data.cursor: expected U8 bytes", f.path);
        goto done;
    }
    memcpy(m, tm->data, tm->nbytes);
    memcpy(v, tv->data, tv->nbytes);
    cursor->len = 0;
    buf_append(cursor, tc->data, tc->nbytes);
done:
    st_close(&f);
    return rc;
}
