/* cli_impl: what the files of the command line share (internal to
 * coordinator/cli/): exit statuses, option parsers, and the subcommands
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
#include <stdint.h>
#include <sys/types.h>

#include "../cluster/cluster.h"
#include "../model/model.h"
#include "../../common/transport.h"
struct cli_model;
int cli_model_open(int argc, char **argv, struct model_params *mp, model **m, struct cli_model **h);
cluster *cli_model_cluster(struct cli_model *h); /* NULL without workers */
const char *cli_model_usage(void);		 /* help text of those options */
void cli_model_close(model **m, struct cli_model **h);
/* After a lost KV host: cli_kv_rehost with local chains allowed. */
int cli_model_kv_rehost(struct cli_model *h, model *m, int *n_hosts);

/* Options common to every subcommand that loads a model. */
struct cli_opts {
	const char *model;
	const char *tokens;
	const char *prompt;
	const char *out;
	long n_prompt;
	long n_predict;
	long threads;
	long pp, tg, reps;
	long top_k;
	double temp, top_p;
	unsigned long long seed;
	int print_ids;
	int ignore_eos; /* generate: end-of-generation tokens do not stop */
	int help;
	/* cluster */
	long workers;	     /* --workers N: spawn N local workers over ipc:// */
	long kv_workers;     /* --kv-workers M: and M local --kv-only workers */
	const char *listen;  /* --listen tcp://0.0.0.0:PORT */
	long expect_workers; /* with --listen */
	const char *transport_name;
	long worker_timeout; /* ms */
	long replicas;
	const char *wire_dtype;
	int stream_weights;
	int stats;
	long balance_window;
	const char *trace_routing;
	const char *rebalance;
	long rebalance_every;
	long slow_worker; /* --worker-slowdown I:F for local worker I */
	double slow_factor;
	const char *cluster_key;     /* --cluster-key: CURVE secret key for --listen tcp:// */
	const char *authorized_keys; /* --authorized-keys: the workers' public keys */
	int insecure;		     /* --insecure: plain tcp:// */
	struct route_opts route;     /* --routing, --router-bias (all zero: the model's own) */
	const char *worker_memory;   /* info: --worker-memory 64G,64G */
	const char *node_memory;     /* info: --node-memory 32G */
	long ctx_size;		     /* info: --ctx-size N */
	int kv_f32;		     /* --kv-type f32 */
	long kv_shards;		     /* --kv-shards V */
	long kv_page;		     /* --kv-page P (0: the default) */
	long kv_hosts;		     /* --kv-hosts N */
	int kv_hosts_given;
	int64_t kv_local; /* --kv-local-memory B, when kv_local_given */
	int kv_local_given;
	long batch;    /* logits: --batch N (0: the default) */
	long depth;    /* bench: --depth D */
	int roofline;  /* bench --roofline */
	int random_kv; /* bench --random-kv: --depth as pseudo-random KV */
};

#define CLI_CLUSTER_OPTS                                                                           \
	" --workers --kv-workers --listen --expect-workers --transport --worker-timeout "          \
	"--replicas"                                                                               \
	" --wire-dtype --stream-weights --stats --balance-window --trace-routing --rebalance"      \
	" --rebalance-every --worker-slowdown --cluster-key --authorized-keys --insecure "         \
	"--routing --router-bias --kv-type --kv-shards --kv-page --kv-hosts --kv-local-memory"

struct cli_cluster {
	pid_t *children;
	int n_children;
	cluster *c; /* owned by the model's backend once attached */
	char ipc_path[128];
};

/* cli.c: the transport to the other ranks when started under mpirun (rank 0),
 * until cli_cluster_setup takes it; cli_mpi_size counts the ranks. */
extern transport *cli_mpi;
extern int cli_mpi_size;

/* cli_options.c */
int cli_parse(int argc, char **argv, const char *allowed, struct cli_opts *o);
/* The model options of o (threads, routing, KV) into mp. */
void cli_model_params(const struct cli_opts *o, struct model_params *mp);
int cli_read_ids(const char *spec, int32_t **ids_out, int *n_out);
double cli_now(void);
int cli_cluster_setup(const struct cli_opts *o, model *m, struct cli_cluster *cc);
/* The KV hosts of o (--kv-shards, --kv-hosts) on c's live workers, attached
 * to the model; *n_hosts (may be NULL) how many. */
int cli_kv_hosts(const struct cli_opts *o, model *m, cluster *c, int *n_hosts);
/* After a failed step: when a KV host was lost, the chains go to the hosts
 * left (cli_kv_hosts) or, with none left and local_ok, back here when their
 * pages fit --kv-local-memory (default: the memory available; *n_hosts 0).
 * The caller then computes its sequences again from their ids.  ERR_PEER when
 * no KV host was lost (the failure was another), ERR_CONFIG (logged) when no
 * host is left and the chains cannot come here. */
int cli_kv_rehost(const struct cli_opts *o, model *m, cluster *c, int local_ok, int *n_hosts);
int cli_trace_setup(const struct cli_opts *o, model *m, const struct cli_cluster *cc);
void cli_cluster_stats(const struct cli_opts *o, const struct cli_cluster *cc);
void cli_route_stats(const struct cli_opts *o, const model *m);
void cli_cluster_finish(struct cli_cluster *cc);

/* cli_info.c */
int cli_info(int argc, char **argv);

/* cli_run.c */
int cli_logits(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_generate(int argc, char **argv);

#endif
