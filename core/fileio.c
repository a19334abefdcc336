// fileio.c: see fileio.h.
#include "core/fileio.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/common.h"

int file_read_all(const char *path, char **out, size_t *len) {
    *out = NULL;
    if (len) *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return mosft_fail(errno == ENOENT ? MOSFT_ERR_INPUT : MOSFT_ERR_RUNTIME, "%s: cannot open: %s",
                          path, strerror(errno));
    mosft_buf b = {0};
    char chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) buf_append(&b, chunk, n);
    int err = ferror(f);
    fclose(f);
    if (err) {
        buf_free(&b);
        return mosft_fail(MOSFT_ERR_RUNTIME, "%s: read error", path);
    }
    *out = buf_cstr(&b);
    if (len) *len = b.len;
    return MOSFT_OK;
}

int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int dir_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int64_t file_size(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    return (int64_t)st.st_size;
}

int mkdir_p(const char *path) {
    char *p = xstrdup(path);
    size_t n = strlen(p);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] == '/' || p[i] == 0) {
            char c = p[i];
            p[i] = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                int e = errno;
                free(p);
                return mosft_fail(MOSFT_ERR_RUNTIME, "%s: cannot create directory: %s", path, strerror(e));
            }
            p[i] = c;
        }
    }
    free(p);
    if (!dir_exists(path)) return mosft_fail(MOSFT_ERR_RUNTIME, "%s: exists and is not a directory", path);
    return MOSFT_OK;
}

char *path_join(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    while (la > 1 && a[la - 1] == '/') la--;
    char *r = xmalloc(la + lb + 2);
    memcpy(r, a, la);
    r[la] = '/';
    memcpy(r + la + 1, b, lb + 1);
    return r;
}

char *path_dirname(const char *path) {
    const char *s = strrchr(path, '/');
    if (!s) return xstrdup(".");
    if (s == path) return xstrdup("/");
    size_t n = (size_t)(s - path);
    char *r = xmalloc(n + 1);
    memcpy(r, path, n);
    r[n] = 0;
    return r;
}

int rm_rf(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return MOSFT_OK;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) return mosft_fail(MOSFT_ERR_RUNTIME, "%s: cannot open directory: %s", path, strerror(errno));
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char *c = path_join(path, e->d_name);
            int rc = rm_rf(c);
            free(c);
            if (rc) {
                closedir(d);
                return rc;
            }
        }
        closedir(d);
        if (rmdir(path) != 0) return mosft_fail(MOSFT_ERR_RUNTIME, "%s: cannot remove: %s", path, strerror(errno));
    } else if (unlink(path) != 0) {
        return mosft_fail(MOSFT_ERR_RUNTIME, "%s: cannot remove: %s", path, strerror(errno));
    }
    return MOSFT_OK;
}

int fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return mosft_fail(MOSFT_ERR_RUNTIME, "%s: cannot open directory: %s", dir, strerror(errno));
    fsync(fd);  // some filesystems refuse fsync on directories; the rename is still atomic
    close(fd);
    return MOSFT_OK;
}

int atomic_open(atomic_file *af, const char *path) {
    memset(af, 0, sizeof *af);
    af->path = xstrdup(path);
    size_t n = strlen(path) + 32;
    af->tmp = xmalloc(n);
    snprintf(af->tmp, n, "%s.tmp.%ld", path, (long)getpid());
    af->f = fopen(af->tmp, "wb");
    if (!af->f) {
        int e = errno;
        int rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: cannot create: %s", af->tmp, strerror(e));
        free(af->path);
        free(af->tmp);
        af->path = af->tmp = NULL;
        return rc;
    }
    return MOSFT_OK;
}

int atomic_commit(atomic_file *af) {
    int rc = MOSFT_OK;
    if (fflush(af->f) != 0 || ferror(af->f))
        rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: write failed: %s", af->tmp, strerror(errno));
    else if (fsync(fileno(af->f)) != 0)
        rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: fsync failed: %s", af->tmp, strerror(errno));
    if (fclose(af->f) != 0 && rc == MOSFT_OK)
        rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: close failed: %s", af->tmp, strerror(errno));
    af->f = NULL;
    if (rc == MOSFT_OK && rename(af->tmp, af->path) != 0)
        rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: rename to %s failed: %s", af->tmp, af->path, strerror(errno));
    if (rc != MOSFT_OK) {
        unlink(af->tmp);
    } else {
        char *d = path_dirname(af->path);
        fsync_dir(d);
        free(d);
    }
    free(af->path);
    free(af->tmp);
    af->path = af->tmp = NULL;
    return rc;
}

void atomic_abort(atomic_file *af) {
    if (af->f) fclose(af->f);
    if (af->tmp) unlink(af->tmp);
    free(af->path);
    free(af->tmp);
    memset(af, 0, sizeof *af);
}

int atomic_write_file(const char *path, const void *data, size_t len) {
    atomic_file af;
    int rc = atomic_open(&af, path);
    if (rc) return rc;
    if (len && fwrite(data, 1, len, af.f) != len) {
        rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: write failed: %s", af.tmp, strerror(errno));
        atomic_abort(&af);
        return rc;
    }
    return atomic_commit(&af);
}
