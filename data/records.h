// records.h: JSON records streamed from one shard (a byte_source).
//
// Three layouts:
//   JSONL       one JSON value per line (blank lines skipped; \r\n accepted);
//   JSON array  one top-level array, streamed element by element: each element's extent is found
//               by a byte scanner (strings, escapes, nesting) and only that element is parsed, so an
//               8 MB CodeAlpaca file never sits in memory as one tree;
//   whole       the whole stream is one JSON value (a SuperNI task file, up to tens of MB).
// REC_AUTO picks JSON array when the first non-blank byte is '[', else JSONL.
//
// Errors name the file and the line where the record starts: "x.jsonl:17: expected a JSON value,
// got invalid JSON at column 9". A malformed JSONL line or array element leaves the reader after
// it (record_reader_can_continue() = 1): the caller may skip it. A broken layout (an array that
// never closes, bytes after it) or an I/O failure cannot be continued.
#ifndef MOSFT_DATA_RECORDS_H
#define MOSFT_DATA_RECORDS_H

#include <cjson/cJSON.h>
#include <stdint.h>

#include "data/source.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { REC_AUTO = 0, REC_JSONL, REC_JSON_ARRAY, REC_WHOLE } record_mode;

// Where the next record starts, for exact resume (serialized into the data cursor).
typedef struct {
    uint64_t offset;  // decompressed byte offset of the next unread byte
    int64_t line;     // 1-based line number at that offset
    int32_t state;    // layout state (array: before '[', expecting an element, after one, done)
    int32_t mode;     // the resolved record_mode (REC_AUTO until the first byte was seen)
} record_pos;

typedef struct record_reader record_reader;

// Open `path` (file or URL) at `at` (NULL: the start).
int record_reader_open(record_reader **out, const char *path, record_mode mode, const record_pos *at,
                       const source_http_opts *http);
// The next record: MOSFT_OK with *out a cJSON tree the caller deletes (NULL at the end of the
// shard) and *line its first line; or an error code with "file:line: reason" recorded.
int record_next(record_reader *r, cJSON **out, int64_t *line);
int record_reader_can_continue(const record_reader *r);
void record_tell(const record_reader *r, record_pos *pos);
const char *record_reader_name(const record_reader *r);
int record_reader_retries(const record_reader *r);  // HTTP retries so far (tests, logs)
void record_reader_close(record_reader *r);

#ifdef __cplusplus
}
#endif
#endif
