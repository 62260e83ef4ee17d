/* cli_keys: 'moefleet keygen', the CURVE key pairs of a secured cluster.
 *
 *   moefleet keygen --out DIR [--name NAME] [--force]
 *     writes DIR/NAME.key (the secret key, mode 0600) and DIR/NAME.pub (the
 *     public key, mode 0644, one line "KEY NAME" that can be appended to an
 *     authorised-keys file as it is); DIR is created with mode 0700 when
 *     missing.  Existing files are kept unless --force.
 *   moefleet keygen --public FILE.key
 *     prints the public key line of a secret key file.
 *
 * The coordinator needs one pair (the cluster key: NAME "cluster" by
 * default) and every worker its own; see docs/OPERATIONS.md. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../common/err.h"
#include "../../common/log.h"
#include "../../common/transport.h"
#include "cli_impl.h"

static const char *cli_usage_keygen =
    "usage: moefleet keygen --out DIR [--name NAME] [--force]\n"
    "       moefleet keygen --public FILE.key\n"
    "  Writes a CURVE key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub\n"
    "  (public).  NAME defaults to 'cluster' (the coordinator's pair); give each\n"
    "  worker its own NAME.  Append the workers' .pub lines to the coordinator's\n"
    "  authorised-keys file and copy cluster.pub to every worker.\n"
    "  --public prints the public key line of an existing secret key.\n";

/* Writes text to path, created with `mode` (O_EXCL unless force). */
static int cli_write_key_file(const char *path, const char *text, mode_t mode, int force)
{
	int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (force ? O_TRUNC : O_EXCL);
	int fd = open(path, flags, mode);
	if (fd < 0) {
		if (errno == EEXIST)
			log_error("%s: already exists (use --force to replace it)", path);
		else
			log_error("%s: cannot create: %s", path, strerror(errno));
		return ERR_IO;
	}
	int rc = 0;
	/* a replaced file keeps its old mode otherwise */
	if (fchmod(fd, mode)) {
		log_error("%s: cannot set mode %03o: %s", path, (unsigned)mode, strerror(errno));
		rc = ERR_IO;
	}
	size_t len = strlen(text), done = 0;
	while (!rc && done < len) {
		ssize_t w = write(fd, text + done, len - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			log_error("%s: cannot write: %s", path, strerror(errno));
			rc = ERR_IO;
		} else {
			done += (size_t)w;
		}
	}
	if (!rc && fsync(fd)) {
		log_error("%s: cannot write: %s", path, strerror(errno));
		rc = ERR_IO;
	}
	if (close(fd) && !rc) {
		log_error("%s: cannot write: %s", path, strerror(errno));
		rc = ERR_IO;
	}
	return rc;
}

static int cli_name_ok(const char *name)
{
	if (!*name || strlen(name) > 64 || name[0] == '.')
		return 0;
	for (const char *p = name; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9') || *p == '-' || *p == '_' || *p == '.'))
			return 0;
	return 1;
}

int cli_keygen(int argc, char **argv)
{
	const char *dir = NULL, *name = "cluster", *public_of = NULL;
	int force = 0;
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			fputs(cli_usage_keygen, stdout);
			return CLI_OK;
		}
		if (!strcmp(a, "--force")) {
			force = 1;
			continue;
		}
		if (i + 1 >= argc ||
		    (strcmp(a, "--out") && strcmp(a, "--name") && strcmp(a, "--public"))) {
			fprintf(stderr, "moefleet keygen: unknown or incomplete argument '%s'\n%s",
				a, cli_usage_keygen);
			return CLI_USAGE;
		}
		const char *v = argv[++i];
		if (!strcmp(a, "--out"))
			dir = v;
		else if (!strcmp(a, "--name"))
			name = v;
		else
			public_of = v;
	}
	if (public_of) {
		char pub[41];
		if (transport_zmq_public_key(public_of, pub))
			return CLI_FAIL;
		printf("%s %s\n", pub, name);
		return CLI_OK;
	}
	if (!dir) {
		fputs(cli_usage_keygen, stderr);
		return CLI_USAGE;
	}
	if (!cli_name_ok(name)) {
		fprintf(stderr,
			"moefleet keygen: --name '%s': use 1-64 letters, digits, '-', '_' or "
			"'.' (not first)\n",
			name);
		return CLI_USAGE;
	}
	if (mkdir(dir, 0700) && errno != EEXIST) {
		log_error("%s: cannot create the key directory: %s", dir, strerror(errno));
		return CLI_FAIL;
	}
	char pub[41], sec[41];
	if (transport_zmq_keygen(pub, sec))
		return CLI_FAIL;
	size_t n = strlen(dir) + strlen(name) + 8;
	char *key_path = malloc(n), *pub_path = malloc(n);
	char text[256];
	int rc = CLI_FAIL;
	if (!key_path || !pub_path) {
		log_error("out of memory");
		goto out;
	}
	snprintf(key_path, n, "%s/%s.key", dir, name);
	snprintf(pub_path, n, "%s/%s.pub", dir, name);
	snprintf(text, sizeof(text),
		 "# moefleet CURVE secret key '%s': keep it private (mode 0600)\n"
		 "# public key: %s\n%s\n",
		 name, pub, sec);
	if (cli_write_key_file(key_path, text, 0600, force))
		goto out;
	snprintf(text, sizeof(text), "%s %s\n", pub, name);
	if (cli_write_key_file(pub_path, text, 0644, force)) {
		unlink(key_path);
		goto out;
	}
	printf("secret key: %s\npublic key: %s\n%s %s\n", key_path, pub_path, pub, name);
	rc = CLI_OK;
out:
	memset(sec, 0, sizeof(sec));
	memset(text, 0, sizeof(text));
	free(key_path);
	free(pub_path);
	return rc;
}
