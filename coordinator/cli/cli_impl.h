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

int cli_quantize(int argc, char **argv);      /* cli_tools.c */
int cli_split_experts(int argc, char **argv); /* cli_tools.c */
int cli_placement(int argc, char **argv);     /* cli_tools.c */
int cli_keygen(int argc, char **argv);	      /* cli_keys.c */
int cli_serve(int argc, char **argv);	      /* cli_serve.c */
int cli_tokenize(int argc, char **argv);      /* cli_serve.c */

/* A model opened with the options every model-running command shares (-m,
 * --threads and the cluster and routing options of argv; anything else is an
 * error): mp gets their routing, KV type and thread count, then the model is
 * opened and the workers attached.  *h is set even on failure;
 * cli_model_close() releases both (and reaps local workers). */
#include "../cluster/cluster.h"
#include "../model/model.h"
struct cli_model;
int cli_model_open(int argc, char **argv, struct model_params *mp, model **m, struct cli_model **h);
cluster *cli_model_cluster(struct cli_model *h); /* NULL without workers */
const char *cli_model_usage(void);		 /* help text of those options */
void cli_model_close(model **m, struct cli_model **h);

#endif
