#include "log.h"
#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int log_quiet;

void log_set_quiet(int quiet)
{
	log_quiet = quiet;
}

int log_is_quiet(void)
{
	return log_quiet;
}

static void log_write_line(const char *level, const char *fmt, va_list ap)
{
	char line[2048];
	int n = snprintf(line, sizeof(line), "moefleet: %s", level);
	if (n < 0)
		return;
	int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	if (m < 0)
		return;
	size_t len = strlen(line);
	line[len++] = '\n';
	/* one write() per line keeps lines from several threads intact */
	ssize_t w = write(STDERR_FILENO, line, len);
	(void)w;
}

void log_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_write_line("error: ", fmt, ap);
	va_end(ap);
}

void log_warn(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_write_line("warning: ", fmt, ap);
	va_end(ap);
}

void log_info(const char *fmt, ...)
{
	if (log_quiet)
		return;
	va_list ap;
	va_start(ap, fmt);
	log_write_line("", fmt, ap);
	va_end(ap);
}

const char *err_str(int code)
{
	switch (code) {
	case ERR_OK: return "ok";
	case ERR_NOMEM: return "out of memory";
	case ERR_IO: return "i/o error";
	case ERR_FORMAT: return "invalid format";
	case ERR_PROTO: return "protocol error";
	case ERR_PEER: return "peer failure";
	case ERR_CONFIG: return "bad configuration";
	case ERR_RANGE: return "out of range";
	default: return "unknown error";
	}
}
