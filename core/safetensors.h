// safetensors.h: reader (mmap, validated) and writer (atomic) for the safetensors format, and
// sharded checkpoints (model.safetensors.index.json).
//
// Format: u64 little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}
// then the raw row-major little-endian data; offsets are relative to the end of the header.
// The reader checks everything against the file size: a lying or truncated file is an input error
// (exit 2) naming the file and the tensor, never an out-of-bounds read.
#ifndef MOSFT_SAFETENSORS_H
#define MOSFT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ST_MAX_DIMS 8

typedef struct {
    char *name;
    mosft_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    uint64_t begin, end;  // byte offsets relative to the data section
    const void *data;     // points into the mapping
    size_t nbytes;
} st_tensor;

typedef struct {
    char *path;
    void *map;
    size_t map_len;
    const uint8_t *data;  // start of the data section
    size_t data_len;
    st_tensor *tensors;  // in file order
    int n_tensors;
    char **meta_keys, **meta_vals;  // __metadata__ (string values)
    int n_meta;
} st_file;

// Open and validate. Returns MOSFT_OK, MOSFT_ERR_INPUT (bad/missing file) or MOSFT_ERR_RUNTIME.
int st_open(st_file *f, const char *path);
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);
const char *st_meta(const st_file *f, const char *key);  // NULL if absent

// Copy a float tensor (F32/F16/BF16/F64) into fp32 `dst` (numel floats).
void st_tensor_to_f32(const st_tensor *t, float *dst);
// Check a tensor's dtype and shape; on mismatch record an input error naming file and tensor.
int st_expect(const st_file *f, const st_tensor *t, mosft_dtype dtype, int ndim, const int64_t *shape);
// Shape as "[a, b, c]" into out.
void st_shape_str(char *out, size_t n, int ndim, const int64_t *shape);

// A set of files that together hold one checkpoint: either a single *.safetensors file, or the
// shards listed in model.safetensors.index.json ("weight_map": {tensor: file}).
typedef struct {
    st_file *files;
    int n_files;
    char *dir;
} st_set;
// `path` is a directory (model.safetensors or model.safetensors.index.json inside) or a file.
int st_set_open(st_set *s, const char *path);
void st_set_close(st_set *s);
// Find a tensor across shards; *file receives its file (may be NULL).
const st_tensor *st_set_find(const st_set *s, const char *name, const st_file **file);
int st_set_count(const st_set *s);

// Writer: collect tensors (data is referenced, not copied: keep it alive until write), then write
// atomically (temp file, fsync, rename).
typedef struct st_writer st_writer;
st_writer *st_writer_new(void);
void st_writer_add(st_writer *w, const char *name, mosft_dtype dtype, int ndim, const int64_t *shape,
                   const void *data);
void st_writer_meta(st_writer *w, const char *key, const char *val);
int st_writer_write(st_writer *w, const char *path);
void st_writer_free(st_writer *w);

#ifdef __cplusplus
}
#endif
#endif
