/* log: one-line diagnostics on stderr.
 *
 * log_error() is for failures the user must see ("moefleet: error: FILE: what
 * went wrong"); log_info() for progress that can be silenced with
 * log_set_quiet(1).  All functions are thread-safe (one write per line). */
#ifndef MOEFLEET_LOG_H
#define MOEFLEET_LOG_H

#if defined(__GNUC__)
#define LOG_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define LOG_PRINTF(a, b)
#endif

void log_error(const char *fmt, ...) LOG_PRINTF(1, 2);
void log_warn(const char *fmt, ...) LOG_PRINTF(1, 2);
void log_info(const char *fmt, ...) LOG_PRINTF(1, 2);
void log_set_quiet(int quiet);
int log_is_quiet(void);

#endif
