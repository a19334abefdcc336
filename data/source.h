// source.h: byte streams for the data loader. One shard is a local file or an http(s):// URL; either
// may be gzip-compressed (detected from the magic bytes, inflated on the fly, multi-member files too).
//
// HTTP(S) goes through libcurl and is streamed: bytes are pulled from the socket as the reader asks
// for them (never downloaded first). A connection that fails, drops mid-body, stalls past the stall
// timeout, or answers 429/5xx is retried with exponential backoff, resuming at the byte offset with
// a Range request; when the server ignores Range (200 instead of 206) the already delivered prefix is
// read again and discarded. Any other 4xx is an input error (exit 2) naming the URL and the status.
//
// Offsets are in the *decompressed* byte stream: source_open_at() seeks a plain local file directly,
// asks an HTTP server for a Range, and for gzip data inflates from the start and discards (gzip has
// no random access; the cursor documents this cost).
#ifndef MOSFT_DATA_SOURCE_H
#define MOSFT_DATA_SOURCE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    double connect_timeout_s;  // TCP (+TLS) connect, per attempt
    double stall_timeout_s;    // no byte for this long while the reader waits: the attempt failed
    int max_retries;           // attempts after the first, per streak of failures without progress
    double backoff_base_s;     // delay before retry k (k = 0, 1, ...): min(base * 2^k, backoff_max_s)
    double backoff_max_s;      // also caps a server's Retry-After
} source_http_opts;

// connect 15 s, stall 60 s, 8 retries, backoff 1 s doubling up to 60 s.
void source_http_opts_default(source_http_opts *o);

typedef struct byte_source byte_source;

int source_is_url(const char *path);  // http:// or https://

// Open a shard at byte 0 (http may be NULL: defaults). Returns MOSFT_OK, or MOSFT_ERR_INPUT for a
// missing file, a malformed URL, a 4xx, or a host that never answered; MOSFT_ERR_RUNTIME for I/O.
int source_open(byte_source **out, const char *path, const source_http_opts *http);
// Open positioned at `offset` bytes of the decompressed stream (see the header comment).
int source_open_at(byte_source **out, const char *path, uint64_t offset, const source_http_opts *http);
// Read up to n bytes. Returns the count (> 0), 0 at the end of the stream, or -1 with the error
// recorded (mosft_error(); its code in mosft_error_code()).
int64_t source_read(byte_source *s, void *buf, size_t n);
uint64_t source_tell(const byte_source *s);  // decompressed bytes delivered so far (from offset 0)
const char *source_name(const byte_source *s);
int source_is_gzip(const byte_source *s);
// HTTP only: attempts that failed and were retried so far (tests and logs).
int source_retries(const byte_source *s);
void source_close(byte_source *s);

// Check that a shard exists before any training starts: a local file must be a readable regular
// file; a URL must answer a HEAD request (retried like a read) with a 2xx/3xx status.
int source_probe(const char *path, const source_http_opts *http);

// Expand a source path into its shards, sorted by name: a URL or a regular file is itself; a
// directory gives its regular, non-hidden files; a pattern with * ? [ is a glob. A missing path
// or an empty match is an input error. *out is a malloc'd array of malloc'd strings.
int source_list_shards(const char *path, char ***out, int *n);
void source_free_shards(char **shards, int n);

#ifdef __cplusplus
}
#endif
#endif
