/* progress: how far a long load has come, told to the user.
 *
 * A progress counter follows `done` bytes out of `total` from the time it was
 * started.  progress_step() decides whether an update is worth a line and
 * formats it:
 *   on a terminal   at most every 0.2 s, and at the end: one line redrawn in
 *                   place ("\r"), with bytes, GiB/s and the time left;
 *   otherwise       one line each time another tenth is complete (10 %, 20 %,
 *                   ... 100 %), with bytes, GiB/s and the time left.
 * Loads under 256 MiB are quick: they show nothing.
 * progress_report() prints what progress_step() formats (stderr, nothing
 * when log_set_quiet(1)).  Times are seconds from any fixed origin (the
 * caller's clock), so the decisions are testable without waiting.  A counter
 * is a plain value: no allocation, nothing to free. */
#ifndef MOEFLEET_PROGRESS_H
#define MOEFLEET_PROGRESS_H

#include <stddef.h>
#include <stdint.h>

struct progress {
	char what[96];
	uint64_t total;
	int tty;
	double t0, last_draw;
	int tenths; /* tenths reported so far (not a terminal) */
	int ended;
};

/* tty < 0: whether stderr is a terminal. */
void progress_start(struct progress *p, const char *what, uint64_t total, int tty, double now);

/* 1 and a line (without newline or "\r") in line[n] when this update is to be
 * shown; 0 otherwise.  `done` is clamped to total; the first update with
 * done == total is always shown, later ones never. */
int progress_step(struct progress *p, uint64_t done, double now, char *line, size_t n);

/* progress_step(), printed. */
void progress_report(struct progress *p, uint64_t done, double now);

/* Seconds on a monotonic clock. */
double progress_now(void);

#endif
