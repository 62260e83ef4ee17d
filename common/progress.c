#include "progress.h"
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PROGRESS_TTY_INTERVAL 0.2
#define PROGRESS_MIN_BYTES    (256ull << 20)

void progress_start(struct progress *p, const char *what, uint64_t total, int tty, double now)
{
	memset(p, 0, sizeof(*p));
	snprintf(p->what, sizeof(p->what), "%s", what);
	p->total = total;
	p->tty = tty < 0 ? isatty(STDERR_FILENO) : tty != 0;
	p->t0 = now;
	p->last_draw = now - PROGRESS_TTY_INTERVAL;
}

static void progress_format(const struct progress *p, uint64_t done, double now, char *line,
			    size_t n)
{
	const double gib = 1024.0 * 1024.0 * 1024.0;
	double dt = now - p->t0, rate = dt > 0 ? (double)done / dt : 0;
	double pct = p->total ? 100.0 * (double)done / (double)p->total : 100.0;
	int k = snprintf(line, n, "%s: %3.0f%% (%.2f of %.2f GiB, %.2f GiB/s", p->what, pct,
			 (double)done / gib, (double)p->total / gib, rate / gib);
	if (k < 0 || (size_t)k >= n)
		return;
	if (done >= p->total)
		snprintf(line + k, n - (size_t)k, ", %.1f s)", dt);
	else if (rate > 0)
		snprintf(line + k, n - (size_t)k, ", %.0f s left)",
			 (double)(p->total - done) / rate);
	else
		snprintf(line + k, n - (size_t)k, ")");
}

int progress_step(struct progress *p, uint64_t done, double now, char *line, size_t n)
{
	if (p->ended || p->total < PROGRESS_MIN_BYTES)
		return 0;
	if (done > p->total)
		done = p->total;
	int end = done == p->total, show;
	if (p->tty) {
		show = end || now - p->last_draw >= PROGRESS_TTY_INTERVAL;
	} else {
		int tenths = p->total ? (int)(10 * done / p->total) : 10;
		show = tenths > p->tenths;
		if (show)
			p->tenths = tenths;
	}
	if (!show)
		return 0;
	p->last_draw = now;
	p->ended = end;
	progress_format(p, done, now, line, n);
	return 1;
}

void progress_report(struct progress *p, uint64_t done, double now)
{
	char line[256];
	if (!progress_step(p, done, now, line, sizeof(line)))
		return;
	if (!p->tty) {
		log_info("%s", line);
		return;
	}
	if (log_is_quiet())
		return;
	/* redrawn in place; the last one ends the line */
	char out[300];
	int k = snprintf(out, sizeof(out), "\rmoefleet: %s\033[K%s", line, p->ended ? "\n" : "");
	if (k > 0) {
		ssize_t w = write(STDERR_FILENO, out,
				  (size_t)k < sizeof(out) ? (size_t)k : sizeof(out) - 1);
		(void)w;
	}
}

double progress_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
