// source.c: local files, gzip and HTTP(S) byte streams (see source.h).
//
// Two layers: a raw transport (a file descriptor, or a libcurl transfer driven by the multi
// interface so that bytes move only when the reader asks) and, on top, an optional zlib inflater.
#include "data/source.h"

#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "core/common.h"
#include "core/version.h"

#define RAW_CHUNK (256 * 1024)        // bytes per read() / inflate input refill
#define HTTP_BUF_HIGH (1024 * 1024)   // pause the transfer when this much is waiting unread

void source_http_opts_default(source_http_opts *o) {
    o->connect_timeout_s = 15;
    o->stall_timeout_s = 60;
    o->max_retries = 8;
    o->backoff_base_s = 1;
    o->backoff_max_s = 60;
}

int source_is_url(const char *path) { return !strncmp(path, "http://", 7) || !strncmp(path, "https://", 8); }

static void sleep_s(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static pthread_once_t g_curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

static const char *http_reason(long code) {
    switch (code) {
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 410: return "Gone";
    case 416: return "Range Not Satisfiable";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "";
    }
}

// Failures worth another attempt: the network or the server's load, not the request itself.
static int curl_retryable(CURLcode res, long status) {
    if (res == CURLE_HTTP_RETURNED_ERROR) return status == 408 || status == 429 || status >= 500;
    switch (res) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_PARTIAL_FILE:
    case CURLE_GOT_NOTHING:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_WEIRD_SERVER_REPLY: return 1;
    default: return 0;
    }
}

static double backoff_delay(const source_http_opts *o, int streak, double retry_after) {
    double d = o->backoff_base_s;
    for (int i = 1; i < streak && d < o->backoff_max_s; i++) d *= 2;
    if (retry_after > d) d = retry_after;
    return d > o->backoff_max_s ? o->backoff_max_s : d;
}

// ---- HTTP transport ---------------------------------------------------------------------------

typedef struct {
    CURL *easy;
    CURLM *multi;
    char *url;
    source_http_opts opt;
    unsigned char *buf;  // received, not yet consumed: buf[pos..len)
    size_t len, pos, cap;
    uint64_t received;       // stream offset of buf[len]: where a resumed attempt starts
    uint64_t range_from;     // Range start of the current attempt
    uint64_t skip;           // bytes of the current response to discard (server ignored Range)
    int64_t total;           // size of the whole resource, -1 unknown
    int active;              // a transfer is in the multi handle
    int started;             // the current response's first body byte was seen
    int paused;
    int eof;
    int bad_range;           // the 206 response starts somewhere else than asked
    int streak;              // consecutive failed attempts without progress
    int retries;             // all retried failures (for tests and logs)
    int ever_ok;             // some attempt delivered a 2xx
    double last_byte_t;
    char content_range[128];
    char errbuf[CURL_ERROR_SIZE];
} http_stream;

static size_t http_header_cb(char *p, size_t size, size_t nm, void *ud) {
    http_stream *h = ud;
    size_t n = size * nm;
    if (n >= 5 && !strncmp(p, "HTTP/", 5)) h->content_range[0] = 0;  // a new response (redirects)
    if (n > 14 && !strncasecmp(p, "Content-Range:", 14)) {
        size_t k = n - 14;
        if (k >= sizeof h->content_range) k = sizeof h->content_range - 1;
        memcpy(h->content_range, p + 14, k);
        h->content_range[k] = 0;
    }
    return n;
}

// First body byte of an attempt: learn the status, the total size and whether Range was honored.
static void http_response_start(http_stream *h) {
    long code = 0;
    curl_easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &code);
    h->skip = 0;
    if (code == 206) {
        unsigned long long a = 0, b = 0;
        char tot[32] = "";
        if (sscanf(h->content_range, " bytes %llu-%llu/%31s", &a, &b, tot) >= 2) {
            if (a > h->range_from) h->bad_range = 1;
            else h->skip = h->range_from - a;  // overlapping range: drop what we already have
            if (tot[0] && tot[0] != '*') h->total = (int64_t)strtoll(tot, NULL, 10);
        }
    } else {
        h->skip = h->range_from;  // 200: the whole body again, skip the prefix we delivered
        curl_off_t cl = -1;
        if (curl_easy_getinfo(h->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl) == CURLE_OK && cl >= 0)
            h->total = (int64_t)cl;
    }
    h->ever_ok = 1;
    h->started = 1;
}

static size_t http_write_cb(char *p, size_t size, size_t nm, void *ud) {
    http_stream *h = ud;
    size_t n = size * nm;
    if (!h->started) http_response_start(h);
    if (h->bad_range) return 0;  // aborts this attempt (CURLE_WRITE_ERROR)
    if (h->skip == 0 && h->len - h->pos >= HTTP_BUF_HIGH) {
        h->paused = 1;
        return CURL_WRITEFUNC_PAUSE;  // curl keeps this chunk and hands it again on unpause
    }
    h->last_byte_t = mosft_now();
    if (h->skip) {
        size_t k = h->skip < n ? (size_t)h->skip : n;
        h->skip -= k;
        p += k;
        n -= k;
        if (!n) return size * nm;
    }
    if (h->pos > 0 && h->len + n > h->cap) {  // compact before growing
        memmove(h->buf, h->buf + h->pos, h->len - h->pos);
        h->len -= h->pos;
        h->pos = 0;
    }
    if (h->len + n > h->cap) {
        size_t c = h->cap ? h->cap : 64 * 1024;
        while (c < h->len + n) c *= 2;
        h->buf = xrealloc(h->buf, c);
        h->cap = c;
    }
    memcpy(h->buf + h->len, p, n);
    h->len += n;
    h->received += n;
    return size * nm;
}

static void http_set_common(CURL *e, const char *url, const source_http_opts *o, char *errbuf) {
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(e, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)(o->connect_timeout_s * 1000));
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "mosft/" MOSFT_VERSION);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    errbuf[0] = 0;
}

static void http_start(http_stream *h) {
    if (h->active) {
        curl_multi_remove_handle(h->multi, h->easy);
        h->active = 0;
    }
    curl_easy_reset(h->easy);
    http_set_common(h->easy, h->url, &h->opt, h->errbuf);
    curl_easy_setopt(h->easy, CURLOPT_WRITEFUNCTION, http_write_cb);
    curl_easy_setopt(h->easy, CURLOPT_WRITEDATA, h);
    curl_easy_setopt(h->easy, CURLOPT_HEADERFUNCTION, http_header_cb);
    curl_easy_setopt(h->easy, CURLOPT_HEADERDATA, h);
    char range[48];
    if (h->received > 0) {
        snprintf(range, sizeof range, "%llu-", (unsigned long long)h->received);
        curl_easy_setopt(h->easy, CURLOPT_RANGE, range);  // copied by curl
    }
    h->range_from = h->received;
    h->skip = 0;
    h->started = 0;
    h->paused = 0;
    h->bad_range = 0;
    h->content_range[0] = 0;
    h->last_byte_t = mosft_now();
    curl_multi_add_handle(h->multi, h->easy);
    h->active = 1;
}

static void http_stream_free(http_stream *h) {
    if (!h) return;
    if (h->active) curl_multi_remove_handle(h->multi, h->easy);
    if (h->easy) curl_easy_cleanup(h->easy);
    if (h->multi) curl_multi_cleanup(h->multi);
    free(h->url);
    free(h->buf);
    free(h);
}

// An attempt ended with `res`: decide between the end of the stream (0), a retry after a pause (1)
// and a failure (-1, recorded).
static int http_after_attempt(http_stream *h, CURLcode res, uint64_t got_before) {
    long status = 0;
    curl_easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(h->multi, h->easy);
    h->active = 0;
    char why[CURL_ERROR_SIZE + 64];
    if (res == CURLE_OK) {
        if (h->total >= 0 && h->received < (uint64_t)h->total) {
            snprintf(why, sizeof why, "connection closed at byte %llu of %lld", (unsigned long long)h->received,
                     (long long)h->total);
            res = CURLE_PARTIAL_FILE;
        } else if (h->total >= 0 && h->range_from > (uint64_t)h->total) {
            mosft_fail(MOSFT_ERR_INPUT, "%s: resume at byte %llu: expected the file to be at least that long, got "
                       "%lld bytes; did it change on the server?", h->url, (unsigned long long)h->range_from,
                       (long long)h->total);
            return -1;
        } else {
            h->eof = 1;
            return 0;
        }
    } else if (res == CURLE_HTTP_RETURNED_ERROR) {
        if (status == 416 && h->range_from > 0) {  // asked past the end: everything was delivered
            h->eof = 1;
            return 0;
        }
        snprintf(why, sizeof why, "HTTP %ld %s", status, http_reason(status));
    } else if (h->bad_range) {
        mosft_fail(MOSFT_ERR_INPUT, "%s: resume at byte %llu: expected a Content-Range starting there, got \"%s\"",
                   h->url, (unsigned long long)h->range_from, h->content_range);
        return -1;
    } else {
        snprintf(why, sizeof why, "%s", h->errbuf[0] ? h->errbuf : curl_easy_strerror(res));
    }
    if (!curl_retryable(res, status)) {
        if (res == CURLE_HTTP_RETURNED_ERROR)
            mosft_fail(MOSFT_ERR_INPUT, "%s: GET: expected HTTP 200, got %ld %s", h->url, status, http_reason(status));
        else
            mosft_fail(MOSFT_ERR_INPUT, "%s: GET: %s", h->url, why);
        return -1;
    }
    if (h->received > got_before) h->streak = 0;  // progress resets the streak
    h->streak++;
    if (h->streak > h->opt.max_retries) {
        int code = h->ever_ok ? MOSFT_ERR_RUNTIME : MOSFT_ERR_INPUT;
        mosft_fail(code, "%s: GET: failed after %d retries (data.http_retries): %s", h->url, h->opt.max_retries, why);
        return -1;
    }
    double retry_after = 0;
    curl_off_t ra = 0;
    if (res == CURLE_HTTP_RETURNED_ERROR && curl_easy_getinfo(h->easy, CURLINFO_RETRY_AFTER, &ra) == CURLE_OK && ra > 0)
        retry_after = (double)ra;
    double d = backoff_delay(&h->opt, h->streak, retry_after);
    h->retries++;
    mosft_log("warning: %s: %s; retry %d/%d in %.2f s (resume at byte %llu)\n", h->url, why, h->streak, h->opt.max_retries, d,
               (unsigned long long)h->received);
    sleep_s(d);
    return 1;
}

// Make at least one byte available in h->buf, or reach the end. Returns 1, 0 (end) or -1 (error).
static int http_fill(http_stream *h) {
    double wait_start = mosft_now();
    uint64_t got_before = h->received;
    for (;;) {
        if (h->len > h->pos) return 1;
        if (h->eof) return 0;
        if (!h->active) {
            http_start(h);
            wait_start = mosft_now();
            got_before = h->received;
        }
        if (h->paused) {  // nothing is buffered any more
            h->paused = 0;
            curl_easy_pause(h->easy, CURLPAUSE_CONT);
        }
        int running = 0;
        curl_multi_perform(h->multi, &running);
        CURLMsg *m;
        int q, done = 0;
        CURLcode res = CURLE_OK;
        while ((m = curl_multi_info_read(h->multi, &q)))
            if (m->msg == CURLMSG_DONE && m->easy_handle == h->easy) {
                done = 1;
                res = m->data.result;
            }
        if (done) {
            int r = http_after_attempt(h, res, got_before);
            if (r < 0) return -1;
            if (r == 0) return h->len > h->pos ? 1 : 0;
            got_before = h->received;  // r == 1: the next loop starts a resumed attempt
            continue;
        }
        if (h->len > h->pos) return 1;
        double now = mosft_now(), last = h->last_byte_t > wait_start ? h->last_byte_t : wait_start;
        if (now - last > h->opt.stall_timeout_s) {
            // Stalled: drop the connection and treat it as a failed attempt (resumed with Range).
            curl_multi_remove_handle(h->multi, h->easy);
            h->active = 0;
            if (h->received > got_before) h->streak = 0;
            h->streak++;
            if (h->streak > h->opt.max_retries) {
                int code = h->ever_ok ? MOSFT_ERR_RUNTIME : MOSFT_ERR_INPUT;
                mosft_fail(code, "%s: GET: failed after %d retries (data.http_retries): no data for %.1f s "
                           "(data.http_read_timeout)", h->url, h->opt.max_retries, h->opt.stall_timeout_s);
                return -1;
            }
            h->retries++;
            double d = backoff_delay(&h->opt, h->streak, 0);
            mosft_log("warning: %s: no data for %.1f s; retry %d/%d in %.2f s\n", h->url, h->opt.stall_timeout_s, h->streak,
                       h->opt.max_retries, d);
            sleep_s(d);
            got_before = h->received;
            continue;
        }
        int wait_ms = (int)((h->opt.stall_timeout_s - (now - last)) * 1000) + 1;
        if (wait_ms > 100) wait_ms = 100;
        curl_multi_poll(h->multi, NULL, 0, wait_ms, NULL);
    }
}

static int http_open(http_stream **out, const char *url, uint64_t offset, const source_http_opts *o) {
    pthread_once(&g_curl_once, curl_init_once);
    http_stream *h = xcalloc(1, sizeof *h);
    h->url = xstrdup(url);
    h->opt = *o;
    h->total = -1;
    h->received = offset;
    h->easy = curl_easy_init();
    h->multi = curl_multi_init();
    if (!h->easy || !h->multi) {
        http_stream_free(h);
        return mosft_fail(MOSFT_ERR_RUNTIME, "%s: libcurl could not start a transfer", url);
    }
    *out = h;
    return MOSFT_OK;
}

// ---- the byte source: raw transport + optional inflate ----------------------------------------

struct byte_source {
    char *name;
    int fd;              // local file, or -1
    http_stream *http;   // URL, or NULL
    unsigned char *in;   // raw bytes: in[in_pos..in_len)
    size_t in_len, in_pos;
    int raw_eof;
    int gz;
    z_stream zs;
    int zs_live;
    int member_done;     // the current gzip member ended; the next one may follow
    uint64_t pos;        // decompressed bytes delivered since offset 0
};

static int64_t raw_read(byte_source *s, unsigned char *buf, size_t n) {
    if (s->http) {
        int r = http_fill(s->http);
        if (r <= 0) return r;
        http_stream *h = s->http;
        size_t k = h->len - h->pos < n ? h->len - h->pos : n;
        memcpy(buf, h->buf + h->pos, k);
        h->pos += k;
        if (h->paused && h->len - h->pos < HTTP_BUF_HIGH / 2) {
            h->paused = 0;
            curl_easy_pause(h->easy, CURLPAUSE_CONT);
        }
        return (int64_t)k;
    }
    for (;;) {
        ssize_t r = read(s->fd, buf, n);
        if (r >= 0) return r;
        if (errno == EINTR) continue;
        mosft_fail(MOSFT_ERR_RUNTIME, "%s: read: %s", s->name, strerror(errno));
        return -1;
    }
}

// Ensure at least `want` unread raw bytes (fewer only at the end). Returns 0 or -1.
static int raw_fill(byte_source *s, size_t want) {
    if (s->in_pos > 0 && s->in_len - s->in_pos < want) {
        memmove(s->in, s->in + s->in_pos, s->in_len - s->in_pos);
        s->in_len -= s->in_pos;
        s->in_pos = 0;
    }
    while (s->in_len - s->in_pos < want && !s->raw_eof) {
        int64_t r = raw_read(s, s->in + s->in_len, RAW_CHUNK - s->in_len);
        if (r < 0) return -1;
        if (r == 0) s->raw_eof = 1;
        s->in_len += (size_t)r;
    }
    return 0;
}

static int source_fail_gz(byte_source *s, const char *what) {
    mosft_fail(MOSFT_ERR_INPUT, "%s: byte %llu: expected gzip data, got %s", s->name, (unsigned long long)s->pos, what);
    return -1;
}

static int64_t gz_read(byte_source *s, unsigned char *buf, size_t n) {
    for (;;) {
        if (s->member_done) {
            // Between members: the next one starts with the magic; zero padding at the end is tolerated.
            if (raw_fill(s, 2) < 0) return -1;
            while (s->in_pos < s->in_len && s->in[s->in_pos] == 0) {
                s->in_pos++;
                if (s->in_pos == s->in_len && raw_fill(s, 2) < 0) return -1;
            }
            if (s->in_pos == s->in_len) return 0;
            if (s->in_len - s->in_pos < 2 || s->in[s->in_pos] != 0x1f || s->in[s->in_pos + 1] != 0x8b)
                return source_fail_gz(s, "trailing bytes after the last member");
            inflateReset(&s->zs);
            s->member_done = 0;
        }
        if (s->in_pos == s->in_len) {
            if (raw_fill(s, 1) < 0) return -1;
            if (s->in_pos == s->in_len) return source_fail_gz(s, "the end of the file inside a member (truncated)");
        }
        s->zs.next_in = s->in + s->in_pos;
        s->zs.avail_in = (uInt)(s->in_len - s->in_pos);
        s->zs.next_out = buf;
        s->zs.avail_out = (uInt)(n > (1u << 30) ? (1u << 30) : n);
        uInt before_out = s->zs.avail_out;
        int ret = inflate(&s->zs, Z_NO_FLUSH);
        s->in_pos = (size_t)(s->zs.next_in - s->in);
        size_t produced = before_out - s->zs.avail_out;
        if (ret == Z_STREAM_END) s->member_done = 1;
        else if (ret == Z_NEED_DICT || ret == Z_DATA_ERROR || ret == Z_MEM_ERROR || ret == Z_STREAM_ERROR) {
            char what[160];
            snprintf(what, sizeof what, "corrupt data (%s)", s->zs.msg ? s->zs.msg : "inflate failed");
            return source_fail_gz(s, what);
        }
        if (produced) return (int64_t)produced;
    }
}

int64_t source_read(byte_source *s, void *buf, size_t n) {
    if (n == 0) return 0;
    int64_t r;
    if (s->gz) {
        r = gz_read(s, buf, n);
    } else if (s->in_pos < s->in_len) {
        size_t k = s->in_len - s->in_pos < n ? s->in_len - s->in_pos : n;
        memcpy(buf, s->in + s->in_pos, k);
        s->in_pos += k;
        r = (int64_t)k;
    } else {
        r = s->raw_eof ? 0 : raw_read(s, buf, n);
        if (r == 0) s->raw_eof = 1;
    }
    if (r > 0) s->pos += (uint64_t)r;
    return r;
}

uint64_t source_tell(const byte_source *s) { return s->pos; }
const char *source_name(const byte_source *s) { return s->name; }
int source_is_gzip(const byte_source *s) { return s->gz; }
int source_retries(const byte_source *s) { return s->http ? s->http->retries : 0; }

void source_close(byte_source *s) {
    if (!s) return;
    if (s->fd >= 0) close(s->fd);
    http_stream_free(s->http);
    if (s->zs_live) inflateEnd(&s->zs);
    free(s->in);
    free(s->name);
    free(s);
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

// Discard `n` decompressed bytes (seeking in gzip data, or past a prefix).
static int source_skip(byte_source *s, uint64_t n) {
    unsigned char tmp[64 * 1024];
    while (n > 0) {
        int64_t r = source_read(s, tmp, n < sizeof tmp ? (size_t)n : sizeof tmp);
        if (r < 0) return mosft_error_code();
        if (r == 0)
            return mosft_fail(MOSFT_ERR_INPUT, "%s: expected at least %llu bytes (the saved data cursor), got %llu; "
                              "did the file change since the checkpoint?",
                              s->name, (unsigned long long)(s->pos + n), (unsigned long long)s->pos);
        n -= (uint64_t)r;
    }
    return MOSFT_OK;
}

int source_open_at(byte_source **out, const char *path, uint64_t offset, const source_http_opts *http) {
    *out = NULL;
    source_http_opts defaults;
    if (!http) {
        source_http_opts_default(&defaults);
        http = &defaults;
    }
    byte_source *s = xcalloc(1, sizeof *s);
    s->name = xstrdup(path);
    s->fd = -1;
    s->in = xmalloc(RAW_CHUNK);
    int rc;
    if (source_is_url(path)) {
        if ((rc = http_open(&s->http, path, 0, http)) != MOSFT_OK) goto fail;
    } else {
        s->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (s->fd < 0) {
            rc = mosft_fail(errno == ENOENT || errno == EACCES || errno == EISDIR ? MOSFT_ERR_INPUT : MOSFT_ERR_RUNTIME,
                            "%s: expected a readable file, got %s", path, strerror(errno));
            goto fail;
        }
    }
    // Gzip is recognized by its magic bytes (1f 8b), whatever the name says.
    if (raw_fill(s, 2) < 0) {
        rc = mosft_error_code();
        goto fail;
    }
    s->gz = s->in_len - s->in_pos >= 2 && s->in[s->in_pos] == 0x1f && s->in[s->in_pos + 1] == 0x8b;
    if (!s->gz && ends_with(path, ".gz")) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: byte 0: expected gzip data (magic 1f 8b), got %s", path,
                        s->in_len == 0 ? "an empty file" : "other bytes");
        goto fail;
    }
    if (s->gz) {
        if (inflateInit2(&s->zs, 15 + 16) != Z_OK) {  // +16: gzip wrapper only
            rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: zlib inflateInit2 failed", path);
            goto fail;
        }
        s->zs_live = 1;
    }
    if (offset > 0) {
        if (!s->gz && s->fd >= 0) {
            if (lseek(s->fd, (off_t)offset, SEEK_SET) < 0) {
                rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: seek to %llu: %s", path, (unsigned long long)offset, strerror(errno));
                goto fail;
            }
            s->in_pos = s->in_len = 0;
            s->raw_eof = 0;
            s->pos = offset;
        } else if (!s->gz && s->http) {
            // Plain data over HTTP: drop the probe transfer and ask for a Range from the offset.
            http_stream *h = s->http;
            if (h->active) {
                curl_multi_remove_handle(h->multi, h->easy);
                h->active = 0;
            }
            h->pos = h->len = 0;
            h->received = offset;
            h->eof = 0;
            h->total = -1;
            s->in_pos = s->in_len = 0;
            s->raw_eof = 0;
            s->pos = offset;
        } else if ((rc = source_skip(s, offset)) != MOSFT_OK) {
            goto fail;
        }
    }
    *out = s;
    return MOSFT_OK;
fail:
    source_close(s);
    return rc;
}

int source_open(byte_source **out, const char *path, const source_http_opts *http) {
    return source_open_at(out, path, 0, http);
}

// ---- probing and shard lists ------------------------------------------------------------------

int source_probe(const char *path, const source_http_opts *http) {
    source_http_opts defaults;
    if (!http) {
        source_http_opts_default(&defaults);
        http = &defaults;
    }
    if (!source_is_url(path)) {
        struct stat st;
        if (stat(path, &st) != 0)
            return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a readable file, got %s", path, strerror(errno));
        if (!S_ISREG(st.st_mode)) return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a regular file, got a directory or device", path);
        if (access(path, R_OK) != 0)
            return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a readable file, got %s", path, strerror(errno));
        return MOSFT_OK;
    }
    pthread_once(&g_curl_once, curl_init_once);
    CURL *e = curl_easy_init();
    if (!e) return mosft_fail(MOSFT_ERR_RUNTIME, "%s: libcurl could not start a transfer", path);
    char errbuf[CURL_ERROR_SIZE];
    int rc = MOSFT_OK;
    // The check before training gets a short budget: a URL that does not answer now should fail the
    // run at once (exit 2), not after minutes of backoff; mid-stream failures get data.http_retries.
    int max_retries = http->max_retries < 2 ? http->max_retries : 2;
    for (int attempt = 0;; attempt++) {
        curl_easy_reset(e);
        http_set_common(e, path, http, errbuf);
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)((http->connect_timeout_s + http->stall_timeout_s) * 1000));
        CURLcode res = curl_easy_perform(e);
        long status = 0;
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
        if (res == CURLE_OK) break;
        // Servers that refuse HEAD are judged by the real GET later.
        if (res == CURLE_HTTP_RETURNED_ERROR && (status == 405 || status == 501)) break;
        if (!curl_retryable(res, status) || attempt >= max_retries) {
            if (res == CURLE_HTTP_RETURNED_ERROR)
                rc = mosft_fail(MOSFT_ERR_INPUT, "%s: HEAD: expected HTTP 200, got %ld %s", path, status, http_reason(status));
            else
                rc = mosft_fail(MOSFT_ERR_INPUT, "%s: HEAD: expected an answer, got \"%s\"%s", path,
                                errbuf[0] ? errbuf : curl_easy_strerror(res),
                                curl_retryable(res, status) ? " after retries (data.http_retries)" : "");
            break;
        }
        curl_off_t ra = 0;
        double retry_after = 0;
        if (res == CURLE_HTTP_RETURNED_ERROR && curl_easy_getinfo(e, CURLINFO_RETRY_AFTER, &ra) == CURLE_OK && ra > 0)
            retry_after = (double)ra;
        double d = backoff_delay(http, attempt + 1, retry_after);
        mosft_log("warning: %s: HEAD: %s; retry %d/%d in %.2f s\n", path, errbuf[0] ? errbuf : curl_easy_strerror(res),
                  attempt + 1, max_retries, d);
        sleep_s(d);
    }
    curl_easy_cleanup(e);
    return rc;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int source_list_shards(const char *path, char ***out, int *n) {
    *out = NULL;
    *n = 0;
    if (!path || !*path) return mosft_fail(MOSFT_ERR_INPUT, "data source: expected a path or URL, got \"\"");
    if (source_is_url(path)) {
        *out = xmalloc(sizeof(char *));
        (*out)[0] = xstrdup(path);
        *n = 1;
        return MOSFT_OK;
    }
    struct stat st;
    char **v = NULL;
    int cnt = 0, cap = 0;
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
        v = xmalloc(sizeof(char *));
        v[cnt++] = xstrdup(path);
    } else if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a readable directory, got %s", path, strerror(errno));
        struct dirent *de;
        while ((de = readdir(d))) {
            if (de->d_name[0] == '.') continue;
            size_t pl = strlen(path);
            char *full = xmalloc(pl + strlen(de->d_name) + 2);
            sprintf(full, "%s%s%s", path, pl && path[pl - 1] == '/' ? "" : "/", de->d_name);
            struct stat fs;
            if (stat(full, &fs) != 0 || !S_ISREG(fs.st_mode)) {
                free(full);
                continue;
            }
            if (cnt == cap) v = xrealloc(v, (size_t)(cap = cap ? cap * 2 : 16) * sizeof(char *));
            v[cnt++] = full;
        }
        closedir(d);
        qsort(v, (size_t)cnt, sizeof(char *), cmp_str);
        if (cnt == 0) return mosft_fail(MOSFT_ERR_INPUT, "%s: expected data files in this directory, got none", path);
    } else if (strpbrk(path, "*?[")) {
        glob_t g;
        int gr = glob(path, 0, NULL, &g);
        if (gr == 0) {
            for (size_t i = 0; i < g.gl_pathc; i++) {
                struct stat fs;
                if (stat(g.gl_pathv[i], &fs) != 0 || !S_ISREG(fs.st_mode)) continue;
                if (cnt == cap) v = xrealloc(v, (size_t)(cap = cap ? cap * 2 : 16) * sizeof(char *));
                v[cnt++] = xstrdup(g.gl_pathv[i]);
            }
        }
        globfree(&g);
        if (cnt == 0) return mosft_fail(MOSFT_ERR_INPUT, "%s: expected files matching this pattern, got none", path);
        qsort(v, (size_t)cnt, sizeof(char *), cmp_str);
    } else {
        return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a file, directory, glob or http(s) URL, got %s", path,
                          strerror(errno));
    }
    *out = v;
    *n = cnt;
    return MOSFT_OK;
}

void source_free_shards(char **shards, int n) {
    for (int i = 0; i < n; i++) free(shards[i]);
    free(shards);
}
