/* quantize: rewrites a GGUF model with its routed-expert tensors in another
 * type (`moefleet quantize`).
 *
 * quantize_file(in, out, type) writes a copy of IN to OUT in which
 *   - every metadata entry is copied byte for byte, in order (general.file_type
 *     and general.name included: llama.cpp only displays them), except a split
 *     model's split.* keys: IN may be the first shard of a split model, and OUT
 *     is always one file with every tensor, in shard order;
 *   - every tensor whose name does not contain "_exps.weight" is copied byte for
 *     byte, and every tensor keeps its name, shape and place in the file;
 *   - every routed-expert tensor (name containing "_exps.weight", any type) not
 *     already of `type` is decoded row by row to float and re-encoded with the
 *     reference quantisers of kernels/quant.h, which give the bytes ggml's
 *     reference quantiser (llama-quantize) gives for the same float values.
 * type is KERN_MXFP4, KERN_Q8_0 or KERN_Q4_0.  Rows are converted on all cores;
 * the output does not depend on the thread count.
 *
 * Everything that can be checked is checked before OUT is touched: the type,
 * IN (gguf_open), the expert rows' lengths (a multiple of 32).  A model with
 * no expert tensors gives a warning and an unchanged copy.  OUT is written as
 * OUT.tmp and renamed into place at the end, so a failure (including a
 * non-finite expert value, an unwritable directory or a full disk) leaves no
 * OUT.tmp and any existing OUT as it was.  Progress goes to log_info.
 *
 * Returns 0 or: ERR_CONFIG (type), ERR_FORMAT (IN invalid, a row length that is
 * not a multiple of 32, a NaN or infinity in an expert), ERR_IO (cannot read IN
 * or write OUT), ERR_NOMEM. */
#ifndef MOEFLEET_QUANTIZE_H
#define MOEFLEET_QUANTIZE_H

#include <stdint.h>

int quantize_file(const char *in, const char *out, uint32_t expert_type);

/* "mxfp4", "q8_0", "q4_0" (any case) -> the type id; ERR_CONFIG (not logged)
 * for anything else. */
int quantize_parse_type(const char *name, uint32_t *out);

/* 1 if tensor `name` is a routed-expert weight that quantize_file converts. */
int quantize_is_expert(const char *name);

#endif
