/* err: the project's error vocabulary.
 *
 * Fallible functions return 0 on success or one of the negative codes below,
 * with their outputs as the last parameters.  The code says what kind of
 * failure it was; the human-readable reason has already been logged (one line,
 * naming the file, key, tensor or peer) by the function that detected it. */
#ifndef MOEFLEET_ERR_H
#define MOEFLEET_ERR_H

enum err {
	ERR_OK = 0,
	ERR_NOMEM = -1,	 /* allocation failed */
	ERR_IO = -2,	 /* read/write/open/mmap failed */
	ERR_FORMAT = -3, /* a file's contents are invalid or unsupported */
	ERR_PROTO = -4,	 /* a peer sent something invalid */
	ERR_PEER = -5,	 /* a peer died, timed out or refused */
	ERR_CONFIG = -6, /* bad argument or option */
	ERR_RANGE = -7,	 /* a value is out of range (token id, position, size) */
};

/* err_str: a short constant name for an error code. */
const char *err_str(int code);

#endif
