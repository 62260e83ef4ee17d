/* replay: feeds files to a fuzz target's LLVMFuzzerTestOneInput() without
 * libFuzzer, so the seed corpus and every input that once crashed are
 * replayed by `make check` with the normal compiler (and under the
 * sanitizer build).  Arguments are files or directories; with none it reads
 * $top_srcdir/tests/fuzz/corpus/FUZZ_NAME and .../regress/FUZZ_NAME.  Prints
 * TAP: one line per directory or file. */
#include "fuzz.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifndef FUZZ_NAME
#error "FUZZ_NAME must name the target"
#endif

static int replay_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		fprintf(stderr, "%s: %s\n", path, strerror(errno));
		return -1;
	}
	size_t cap = 4096, len = 0;
	uint8_t *buf = malloc(cap);
	while (buf) {
		size_t r = fread(buf + len, 1, cap - len, f);
		len += r;
		if (r == 0)
			break;
		if (len == cap) {
			uint8_t *nb = realloc(buf, cap *= 2);
			if (!nb)
				free(buf);
			buf = nb;
		}
	}
	fclose(f);
	if (!buf)
		return -1;
	/* an exact-size copy, so reads past the end are caught by ASan */
	uint8_t *exact = malloc(len ? len : 1);
	if (!exact) {
		free(buf);
		return -1;
	}
	memcpy(exact, buf, len);
	free(buf);
	LLVMFuzzerTestOneInput(exact, len);
	free(exact);
	return 0;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Returns the number of inputs replayed, or -1. */
static long replay_path(const char *path)
{
	struct stat st;
	if (stat(path, &st))
		return 0; /* an absent directory has no inputs */
	if (!S_ISDIR(st.st_mode))
		return replay_file(path) ? -1 : 1;
	DIR *d = opendir(path);
	if (!d)
		return -1;
	char **names = NULL;
	size_t n = 0, cap = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			char **nn = realloc(names, cap * sizeof(*nn));
			if (!nn)
				break;
			names = nn;
		}
		names[n++] = strdup(e->d_name);
	}
	closedir(d);
	if (n)
		qsort(names, n, sizeof(*names), cmp_str);
	long done = 0;
	for (size_t i = 0; i < n; i++) {
		char p[4096];
		snprintf(p, sizeof(p), "%s/%s", path, names[i]);
		if (names[i] && replay_file(p) == 0)
			done++;
		free(names[i]);
	}
	free(names);
	return done;
}

int main(int argc, char **argv)
{
	const char *top = getenv("top_srcdir");
	char dirs[2][4096];
	const char *paths[2];
	int n = argc - 1;
	if (n == 0) {
		snprintf(dirs[0], sizeof(dirs[0]), "%s/tests/fuzz/corpus/%s", top ? top : ".",
			 FUZZ_NAME);
		snprintf(dirs[1], sizeof(dirs[1]), "%s/tests/fuzz/regress/%s", top ? top : ".",
			 FUZZ_NAME);
		paths[0] = dirs[0];
		paths[1] = dirs[1];
		n = 2;
	}
	printf("1..%d\n", n);
	int fail = 0;
	for (int i = 0; i < n; i++) {
		const char *p = argc > 1 ? argv[i + 1] : paths[i];
		long k = replay_path(p);
		if (k < 0)
			fail++;
		printf("%s %d - %s: %ld input(s) from %s\n", k < 0 ? "not ok" : "ok", i + 1,
		       FUZZ_NAME, k < 0 ? 0 : k, p);
	}
	return fail ? 1 : 0;
}
