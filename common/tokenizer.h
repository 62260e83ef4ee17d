/* tokenizer: GPT-2 style byte-level BPE read from a GGUF file, matching llama.cpp.
 *
 * tokenizer_new() reads tokenizer.ggml.{model,pre,tokens,token_type,merges},
 * the special token ids and add_bos/add_eos, validates all of them (model must
 * be "gpt2"; token_type and <arch>.vocab_size agree with the token count;
 * every id is in range; every merge is "LEFT RIGHT"; no duplicate tokens)
 * and logs one line "FILE: key K: problem" before returning ERR_FORMAT.
 * Token types get llama.cpp's load-time adjustments (end-of-generation and FIM
 * texts such as "<|endoftext|>" become CONTROL, gpt-oss's "<|channel|>" etc.
 * become USER_DEFINED), so special-token matching and rendering agree with it.
 *
 * Encoding (tokenizer_encode), as llama.cpp's llama_tokenize(add_special =
 * false):
 *   1. special tokens: longest text first, every non-overlapping occurrence
 *      (leftmost first) of a USER_DEFINED token text, and with parse_special
 *      also of CONTROL and UNKNOWN texts, becomes that token and splits the
 *      text into fragments (llama.cpp tokenizer_st_partition);
 *   2. each fragment is decoded like llama.cpp decodes UTF-8: a byte that does
 *      not start a complete sequence becomes U+FFFD (overlong forms and
 *      surrogates are kept as llama.cpp keeps them; sequences above U+10FFFF,
 *      on which llama.cpp aborts, are treated as invalid bytes);
 *   3. the pre-tokenizer's regexes (chosen by tokenizer.ggml.pre: "default",
 *      "deepseek-v3", "qwen2", "gpt-4o") split it in turn, each regex splitting
 *      every piece of the previous one into matches and the gaps between them
 *      (llama.cpp unicode_regex_split); PCRE2 runs them, with Unicode classes
 *      patched to llama.cpp's Unicode 15.1 tables;
 *   4. every piece's bytes are merged by BPE (lowest merge rank first, leftmost
 *      on ties) and the resulting symbols looked up as tokens.
 * BOS/EOS are never added: callers prepend tokenizer_bos() when
 * tokenizer_add_bos() is set.
 *
 * Decoding: a token's piece is its bytes (the GPT-2 byte-to-unicode spelling
 * undone).  CONTROL and UNKNOWN tokens render as empty unless `special` is set,
 * then as their text; USER_DEFINED tokens always render as their text; UNUSED
 * tokens render as empty (llama.cpp llama_token_to_piece, lstrip = 0).
 * Pieces are not "space-cleaned" (llama.cpp's detokenize may drop a space
 * before punctuation for some vocabularies; its streamed output does not).
 * A tokenizer_stream concatenates pieces and only ever emits complete UTF-8
 * characters: an incomplete tail is held until the next push, and bytes that
 * cannot be part of valid UTF-8 become U+FFFD (one per maximal invalid
 * subsequence, as the WHATWG decoder does).
 *
 * A tokenizer is immutable after tokenizer_new() and may be shared between
 * threads; a stream belongs to one thread.  Neither keeps a reference to the
 * gguf. */
#ifndef MOEFLEET_TOKENIZER_H
#define MOEFLEET_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"

/* Token attributes: bit flags, as llama.cpp's llama_token_attr. */
enum tokenizer_attr {
	TOKENIZER_ATTR_UNDEFINED = 0,
	TOKENIZER_ATTR_UNKNOWN = 1 << 0,
	TOKENIZER_ATTR_UNUSED = 1 << 1,
	TOKENIZER_ATTR_NORMAL = 1 << 2,
	TOKENIZER_ATTR_CONTROL = 1 << 3,
	TOKENIZER_ATTR_USER_DEFINED = 1 << 4,
	TOKENIZER_ATTR_BYTE = 1 << 5,
};

typedef struct tokenizer tokenizer;
typedef struct tokenizer_stream tokenizer_stream;

int tokenizer_new(const gguf *g, tokenizer **out);
void tokenizer_destroy(tokenizer **t);

/* Encodes len bytes of text (any bytes; need not be NUL-terminated or valid
 * UTF-8; NULL only when len is 0).  Writes at most cap ids and sets *n_out to
 * the number of tokens of the whole text; returns ERR_RANGE (without logging)
 * when that exceeds cap, so a second call with a buffer of *n_out ids
 * succeeds.  ERR_NOMEM on allocation failure; ERR_RANGE (logged) if the
 * regex engine gives up (resource limits; not seen on 1 MB runs). */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int parse_special,
		     int32_t *ids, size_t cap, size_t *n_out);

/* Copies token id's piece (see above) into buf; sets *n_out to its length.
 * ERR_RANGE if id is out of range or the piece is longer than cap (then
 * *n_out is the length needed).  No NUL is written. */
int tokenizer_piece(const tokenizer *t, int32_t id, int special, char *buf, size_t cap,
		    size_t *n_out);
/* The longest piece of any token (special or not), in bytes. */
size_t tokenizer_max_piece(const tokenizer *t);

int32_t tokenizer_n_vocab(const tokenizer *t);
/* BOS / EOS ids, -1 if none.  Without a tokenizer.ggml.bos/eos_token_id key
 * both are 11, llama.cpp's default for "gpt2" vocabularies. */
int32_t tokenizer_bos(const tokenizer *t);
int32_t tokenizer_eos(const tokenizer *t);
int tokenizer_add_bos(const tokenizer *t);
int tokenizer_add_eos(const tokenizer *t);
/* 1 if id ends generation (EOS, EOT, EOM and llama.cpp's end-of-generation texts). */
int tokenizer_is_eog(const tokenizer *t, int32_t id);
/* enum tokenizer_attr bits of id after load-time adjustments; 0 if out of range. */
int tokenizer_attr(const tokenizer *t, int32_t id);
/* The token whose text (as stored in the GGUF) is exactly text[0..len), or -1. */
int32_t tokenizer_find(const tokenizer *t, const char *text, size_t len);
/* tokenizer.ggml.pre as used ("default" when the key is absent). */
const char *tokenizer_pre_name(const tokenizer *t);

/* Incremental detokenisation.  special: render CONTROL tokens as their text. */
int tokenizer_stream_new(const tokenizer *t, int special, tokenizer_stream **out);
void tokenizer_stream_destroy(tokenizer_stream **s);
/* The most bytes one push or flush can write: size buf by this and
 * ERR_RANGE cannot happen. */
size_t tokenizer_stream_bound(const tokenizer_stream *s);
/* Appends id's piece and writes the complete UTF-8 characters now available
 * into buf (*n_out bytes, possibly 0).  ERR_RANGE if id is out of range or the
 * output does not fit cap (then nothing is consumed and *n_out is the size
 * needed). */
int tokenizer_stream_push(tokenizer_stream *s, int32_t id, char *buf, size_t cap, size_t *n_out);
/* Writes what is still held (an incomplete character becomes U+FFFD) and
 * resets the stream. */
int tokenizer_stream_flush(tokenizer_stream *s, char *buf, size_t cap, size_t *n_out);

#endif
