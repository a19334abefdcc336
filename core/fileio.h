// fileio.h: whole-file reads, crash-safe (atomic) writes, directories and paths.
//
// Atomic write protocol (sqlite/redis style): write to "<path>.tmp.<pid>", fflush, fsync, rename over
// <path>, fsync the directory. A crash or a full disk leaves either the old file or the new one,
// never a torn one.
#ifndef MOSFT_FILEIO_H
#define MOSFT_FILEIO_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

// Read a whole file into a NUL-terminated buffer. Returns MOSFT_OK or an error (missing file: input).
int file_read_all(const char *path, char **out, size_t *len);
int file_exists(const char *path);
int dir_exists(const char *path);
int64_t file_size(const char *path);  // -1 if missing
// mkdir -p. Returns MOSFT_OK or a runtime error naming the path.
int mkdir_p(const char *path);
// Join two path parts with one '/' into a new malloc'd string.
char *path_join(const char *a, const char *b);
// Directory part of a path (new string; "." when there is none).
char *path_dirname(const char *path);
// Remove a directory tree (used by "keep last N checkpoints"). Returns MOSFT_OK or runtime error.
int rm_rf(const char *path);

typedef struct {
    FILE *f;
    char *path;  // final path
    char *tmp;   // temporary path
} atomic_file;
// Open a temporary file beside `path` for writing.
int atomic_open(atomic_file *af, const char *path);
// Flush, fsync, rename over the final path, fsync the directory. Closes the file in all cases.
int atomic_commit(atomic_file *af);
// Close and delete the temporary file (on an error path).
void atomic_abort(atomic_file *af);
// Write a whole buffer atomically.
int atomic_write_file(const char *path, const void *data, size_t len);
// fsync a directory (after renames inside it).
int fsync_dir(const char *dir);

#ifdef __cplusplus
}
#endif
#endif
