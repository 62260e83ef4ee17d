/* cli_impl: what the files of the command line share (internal to
 * coordinator/cli*.c): exit statuses, option parsers, and the subcommands
 * defined outside cli.c.  Each subcommand takes the arguments after its name
 * and returns the exit status. */
#ifndef MOEFLEET_CLI_IMPL_H
#define MOEFLEET_CLI_IMPL_H

enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2 };

/* Parse an integer / number in [lo, hi]; print the problem and return -1. */
int cli_parse_long(const char *opt, const char *s, long lo, long hi, long *out);
int cli_parse_double(const char *opt, const char *s, double lo, double hi, double *out);

int cli_quantize(int argc, char **argv);  /* cli_tools.c */
int cli_placement(int argc, char **argv); /* cli_tools.c */
int cli_keygen(int argc, char **argv);    /* cli_keys.c */

#endif
