#define _GNU_SOURCE
#include "cli.h"
#include "cli_impl.h"
#include "../cluster/cluster.h"
#include "../model/footprint.h"
#include "../model/model.h"
#include "../../common/transport.h"
#include "../../common/wire.h"
#include "../../worker/worker.h"
#include "../serve/sampler.h"
#include "../placement/trace.h"
#include "../../common/tokenizer.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"
#include "../model/ops.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

/* ------------------------------------------------------------ arguments */

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
	int help;
	/* cluster */
	long workers;	     /* --workers N: spawn N local workers over ipc:// */
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
	int roofline;		     /* bench --roofline */
};

#define CLI_CLUSTER_OPTS                                                                           \
	" --workers --listen --expect-workers --transport --worker-timeout --replicas"             \
	" --wire-dtype --stream-weights --stats --balance-window --trace-routing --rebalance"      \
	" --rebalance-every --worker-slowdown --cluster-key --authorized-keys --insecure "         \
	"--routing --router-bias --kv-type"

int cli_parse_long(const char *opt, const char *s, long lo, long hi, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi) {
		fprintf(stderr, "moefleet: %s: '%s' is not an integer in [%ld, %ld]\n", opt, s, lo,
			hi);
		return -1;
	}
	*out = v;
	return 0;
}

int cli_parse_double(const char *opt, const char *s, double lo, double hi, double *out)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= lo && v <= hi)) {
		fprintf(stderr, "moefleet: %s: '%s' is not a number in [%g, %g]\n", opt, s, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

/* Parses the options allowed by `allowed` (a space-separated list of long
 * names, e.g. "-m --tokens").  Returns 0, or -1 after printing the problem. */
static int cli_parse(int argc, char **argv, const char *allowed, struct cli_opts *o)
{
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			o->help = 1;
			continue;
		}
		char key[64];
		snprintf(key, sizeof(key), " %s ", a);
		char list[512];
		snprintf(list, sizeof(list), " %s ", allowed);
		if (a[0] != '-' || !strstr(list, key)) {
			fprintf(stderr, "moefleet: unknown argument '%s'\n", a);
			return -1;
		}
		if (!strcmp(a, "--print-ids")) {
			o->print_ids = 1;
			continue;
		}
		if (!strcmp(a, "--stream-weights")) {
			o->stream_weights = 1;
			continue;
		}
		if (!strcmp(a, "--stats")) {
			o->stats = 1;
			continue;
		}
		if (!strcmp(a, "--roofline")) {
			o->roofline = 1;
			continue;
		}
		if (!strcmp(a, "--insecure")) {
			o->insecure = 1;
			continue;
		}
		if (i + 1 >= argc) {
			fprintf(stderr, "moefleet: %s needs a value\n", a);
			return -1;
		}
		const char *v = argv[++i];
		long l;
		if (!strcmp(a, "-m") || !strcmp(a, "--model"))
			o->model = v;
		else if (!strcmp(a, "--tokens"))
			o->tokens = v;
		else if (!strcmp(a, "-p") || !strcmp(a, "--prompt"))
			o->prompt = v;
		else if (!strcmp(a, "--out") || !strcmp(a, "-o"))
			o->out = v;
		else if (!strcmp(a, "--n-prompt")) {
			if (cli_parse_long(a, v, 0, 1L << 24, &o->n_prompt))
				return -1;
		} else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
			if (cli_parse_long(a, v, 0, 1L << 24, &o->n_predict))
				return -1;
		} else if (!strcmp(a, "--threads") || !strcmp(a, "-t")) {
			if (cli_parse_long(a, v, 1, 256, &o->threads))
				return -1;
		} else if (!strcmp(a, "--pp")) {
			if (cli_parse_long(a, v, 0, 1L << 20, &o->pp))
				return -1;
		} else if (!strcmp(a, "--tg")) {
			if (cli_parse_long(a, v, 0, 1L << 20, &o->tg))
				return -1;
		} else if (!strcmp(a, "--reps")) {
			if (cli_parse_long(a, v, 1, 1000, &o->reps))
				return -1;
		} else if (!strcmp(a, "--top-k")) {
			if (cli_parse_long(a, v, 0, 1L << 30, &o->top_k))
				return -1;
		} else if (!strcmp(a, "--temp")) {
			if (cli_parse_double(a, v, 0.0, 100.0, &o->temp))
				return -1;
		} else if (!strcmp(a, "--top-p")) {
			if (cli_parse_double(a, v, 0.0, 1.0, &o->top_p))
				return -1;
		} else if (!strcmp(a, "--workers")) {
			if (cli_parse_long(a, v, 0, 64, &o->workers))
				return -1;
		} else if (!strcmp(a, "--balance-window")) {
			if (cli_parse_long(a, v, 1, 1L << 30, &o->balance_window))
				return -1;
		} else if (!strcmp(a, "--expect-workers")) {
			if (cli_parse_long(a, v, 1, 4096, &o->expect_workers))
				return -1;
		} else if (!strcmp(a, "--worker-timeout")) {
			if (cli_parse_long(a, v, 1, 3600000, &o->worker_timeout))
				return -1;
		} else if (!strcmp(a, "--replicas")) {
			if (cli_parse_long(a, v, 1, 64, &o->replicas))
				return -1;
		} else if (!strcmp(a, "--rebalance")) {
			if (strcmp(v, "eplb") && strcmp(v, "hetero") && strcmp(v, "migrate")) {
				fprintf(
				    stderr,
				    "moefleet: --rebalance: '%s' is not eplb, hetero or migrate\n",
				    v);
				return -1;
			}
			o->rebalance = v;
		} else if (!strcmp(a, "--worker-slowdown")) {
			char *end;
			errno = 0;
			o->slow_worker = strtol(v, &end, 10);
			if (errno || *end != ':' || o->slow_worker < 0 ||
			    cli_parse_double(a, end + 1, 1.0, 1000.0, &o->slow_factor))
				return -1;
		} else if (!strcmp(a, "--rebalance-every")) {
			if (cli_parse_long(a, v, 1, 1L << 30, &o->rebalance_every))
				return -1;
		} else if (!strcmp(a, "--trace-routing")) {
			o->trace_routing = v;
		} else if (!strcmp(a, "--listen")) {
			o->listen = v;
		} else if (!strcmp(a, "--cluster-key")) {
			o->cluster_key = v;
		} else if (!strcmp(a, "--authorized-keys")) {
			o->authorized_keys = v;
		} else if (!strcmp(a, "--transport")) {
			if (strcmp(v, "inproc") && strcmp(v, "zmq") && strcmp(v, "mpi")) {
				fprintf(stderr,
					"moefleet: --transport: '%s' is not inproc, zmq or mpi\n",
					v);
				return -1;
			}
			o->transport_name = v;
		} else if (!strcmp(a, "--wire-dtype")) {
			if (strcmp(v, "q8_0") && strcmp(v, "q8_1") && strcmp(v, "q8_k") &&
			    strcmp(v, "bf16") && strcmp(v, "f32")) {
				fprintf(stderr,
					"moefleet: --wire-dtype: '%s' is not q8_0, q8_1, q8_k, "
					"bf16 or f32\n",
					v);
				return -1;
			}
			o->wire_dtype = v;
		} else if (!strcmp(a, "--worker-memory")) {
			o->worker_memory = v;
		} else if (!strcmp(a, "--node-memory")) {
			o->node_memory = v;
		} else if (!strcmp(a, "--ctx-size")) {
			if (cli_parse_long(a, v, 1, 1L << 24, &o->ctx_size))
				return -1;
		} else if (!strcmp(a, "--routing")) {
			if (route_parse_routing(v, &o->route))
				return -1;
		} else if (!strcmp(a, "--kv-type")) {
			if (strcmp(v, "f16") && strcmp(v, "f32")) {
				fprintf(stderr, "moefleet: --kv-type: '%s' is not f16 or f32\n", v);
				return -1;
			}
			o->kv_f32 = !strcmp(v, "f32");
		} else if (!strcmp(a, "--router-bias")) {
			if (route_parse_bias(v, &o->route))
				return -1;
		} else if (!strcmp(a, "--seed")) {
			if (cli_parse_long(a, v, 0, 0x7fffffffL, &l))
				return -1;
			o->seed = (unsigned long long)l;
		} else {
			fprintf(stderr, "moefleet: unknown argument '%s'\n", a);
			return -1;
		}
	}
	return 0;
}

/* Reads token ids: "1,2,3" or "@file" (ids separated by commas or white space). */
static int cli_read_ids(const char *spec, int32_t **ids_out, int *n_out)
{
	int rc = 0;
	char *text = NULL;
	int32_t *ids = NULL;
	*ids_out = NULL;
	*n_out = 0;
	if (spec[0] == '@') {
		FILE *f = fopen(spec + 1, "rb");
		if (!f) {
			log_error("%s: cannot open: %s", spec + 1, strerror(errno));
			return ERR_IO;
		}
		size_t cap = 4096, len = 0;
		text = malloc(cap);
		while (text) {
			size_t r = fread(text + len, 1, cap - len - 1, f);
			len += r;
			if (r == 0)
				break;
			if (len + 1 == cap) {
				if (cap > (64u << 20)) {
					log_error("%s: token file is too large", spec + 1);
					rc = ERR_RANGE;
					break;
				}
				char *t = realloc(text, cap *= 2);
				if (!t) {
					free(text);
					text = NULL;
				}
				text = t;
			}
		}
		fclose(f);
		if (!text)
			return ERR_NOMEM;
		if (rc)
			goto out;
		text[len] = 0;
	} else {
		text = strdup(spec);
		if (!text)
			return ERR_NOMEM;
	}
	size_t n = 0, cap = 0;
	const char *p = text;
	for (;;) {
		while (*p == ',' || *p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
			p++;
		if (!*p)
			break;
		char *end;
		errno = 0;
		long v = strtol(p, &end, 10);
		if (end == p || errno || v < 0 || v > 0x7fffffff ||
		    (*end && *end != ',' && *end != ' ' && *end != '\t' && *end != '\n' &&
		     *end != '\r')) {
			log_error("invalid token id near '%.20s' (expected non-negative integers "
				  "separated by commas or white space)",
				  p);
			rc = ERR_CONFIG;
			goto out;
		}
		if (n == cap) {
			cap = cap ? cap * 2 : 256;
			int32_t *t = realloc(ids, cap * sizeof(int32_t));
			if (!t) {
				rc = ERR_NOMEM;
				goto out;
			}
			ids = t;
		}
		ids[n++] = (int32_t)v;
		p = end;
	}
	if (n == 0) {
		log_error("no token ids given");
		rc = ERR_CONFIG;
		goto out;
	}
	if (n > (1u << 24)) {
		log_error("too many tokens (%zu)", n);
		rc = ERR_RANGE;
		goto out;
	}
	*ids_out = ids;
	*n_out = (int)n;
	ids = NULL;
out:
	free(ids);
	free(text);
	return rc;
}

static double cli_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------ cluster */

static transport *cli_mpi; /* set when started under mpirun (rank 0) */
static int cli_mpi_size;

static const char *cli_usage_cluster =
    "cluster options (any command that runs a model):\n"
    "  --workers N            spawn N local expert workers over ZeroMQ ipc://\n"
    "  --listen ENDPOINT      wait for remote workers (moefleet-worker --connect ...)\n"
    "  --expect-workers N     how many workers --listen waits for (default 1)\n"
    "  --transport T          inproc (default), zmq, or mpi (under mpirun)\n"
    "  --worker-timeout MS    drop a worker silent this long in a step (10000); its\n"
    "                         rows go to other replicas, its experts are re-created\n"
    "  --replicas R           copies of each expert (default 1)\n"
    "  --wire-dtype D         q8_0 | q8_1 | q8_k | bf16 | f32 activations on the wire\n"
    "                         (default: the experts' own activation type: Q8_0, Q8_1\n"
    "                         or Q8_K for quantised experts; others fall back to f32)\n"
    "  --stream-weights       send expert weights to workers even if they have the file\n"
    "  --stats                print per-worker statistics and the expert balance at the end\n"
    "  --balance-window N     tokens over which router counts decay (default 4096)\n"
    "  --trace-routing FILE   record every routing decision (see 'moefleet placement')\n"
    "  --rebalance POLICY     re-place experts live from the router counts: eplb,\n"
    "                         hetero or migrate (workers need their own model file)\n"
    "  --rebalance-every N    forward steps between re-plans (default 16)\n"
    "  --worker-slowdown I:F  local worker I takes F times as long (testing)\n"
    "  --cluster-key FILE     CURVE secret key for --listen tcp:// ('moefleet keygen')\n"
    "  --authorized-keys FILE public keys of the workers allowed to connect\n"
    "  --insecure             plain, unauthenticated tcp:// (trusted networks only)\n"
    "routing options (any command that runs a model; default: the model's own top-k):\n"
    "  --routing topp:T[,min=K1][,max=K2]\n"
    "                         per token, take experts by selection score until their\n"
    "                         normalised scores sum to T, clamped to [K1, K2] (default\n"
    "                         1 and the model's k); 'topk' is the model's routing\n"
    "  --router-bias E1,E2,...:B  add B to these experts' selection scores (testing)\n"
    "  (with --routing topp, --router-bias or --stats: mean experts per token per layer)\n"
    "  --kv-type f16|f32       KV cache element type (default f16, as llama.cpp;\n"
    "                         deepseek4 only)\n";

struct cli_cluster {
	pid_t *children;
	int n_children;
	cluster *c; /* owned by the model's backend once attached */
	char ipc_path[128];
};

static int cli_spawn_workers(const struct cli_opts *o, const char *endpoint, struct cli_cluster *cc)
{
	char self[4096];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 32);
	if (n <= 0) {
		log_error("cannot find this program's path to start workers");
		return ERR_CONFIG;
	}
	self[n] = 0;
	char *slash = strrchr(self, '/');
	snprintf(slash + 1, sizeof(self) - (size_t)(slash + 1 - self), "moefleet-worker");
	if (access(self, X_OK) != 0) {
		log_error("%s: cannot start workers: %s", self, strerror(errno));
		return ERR_CONFIG;
	}
	cc->children = calloc((size_t)o->workers, sizeof(pid_t));
	if (!cc->children)
		return ERR_NOMEM;
	pid_t parent = getpid();
	for (int i = 0; i < o->workers; i++) {
		char name[32];
		snprintf(name, sizeof(name), "local-%d", i);
		pid_t pid = fork();
		if (pid < 0) {
			log_error("cannot start worker %d: %s", i, strerror(errno));
			return ERR_CONFIG;
		}
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGTERM);
			if (getppid() != parent)
				_exit(1);
			char slow[32];
			snprintf(slow, sizeof(slow), "%g", o->slow_factor);
			char *args[] = {self,	     "--connect", (char *)endpoint,
					"--threads", "1",	  "--name",
					name,	     NULL,	  NULL,
					NULL,	     NULL,	  NULL};
			int na = 7;
			if (o->slow_factor > 1.0 && o->slow_worker == i) {
				args[na++] = "--slowdown";
				args[na++] = slow;
			}
			if (!o->stream_weights) { /* without a model copy weights are streamed */
				args[na++] = "-m";
				args[na++] = (char *)o->model;
			}
			execv(self, args);
			_exit(127);
		}
		cc->children[cc->n_children++] = pid;
	}
	return 0;
}

/* Attaches remote experts to m as the options ask; nothing for in-process. */
static int cli_cluster_setup(const struct cli_opts *o, model *m, struct cli_cluster *cc)
{
	memset(cc, 0, sizeof(*cc));
	transport *t = NULL;
	int n_workers = 0;
	int rc = 0;
	const char *tn = o->transport_name ? o->transport_name : "";
	if (!strcmp(tn, "mpi") || (cli_mpi && strcmp(tn, "inproc"))) {
		if (!cli_mpi) {
			log_error("--transport mpi: not started by mpirun");
			return ERR_CONFIG;
		}
		t = cli_mpi;
		cli_mpi = NULL;
		n_workers = cli_mpi_size - 1;
		if (n_workers < 1) {
			log_error(
			    "--transport mpi needs at least 2 ranks (1 coordinator + workers)");
			transport_destroy(&t);
			return ERR_CONFIG;
		}
	} else if (o->workers > 0) {
		snprintf(cc->ipc_path, sizeof(cc->ipc_path), "ipc:///tmp/moefleet-%ld.sock",
			 (long)getpid());
		rc = transport_zmq_listen(cc->ipc_path, &t);
		if (rc)
			return rc;
		rc = cli_spawn_workers(o, cc->ipc_path, cc);
		if (rc) {
			transport_destroy(&t);
			return rc;
		}
		n_workers = (int)o->workers;
	} else if (o->listen) {
		struct transport_zmq_security sec = {.insecure = o->insecure,
						     .key_file = o->cluster_key,
						     .authorized_keys_file = o->authorized_keys};
		rc = transport_zmq_listen_secure(o->listen, &sec, &t);
		if (rc)
			return rc;
		n_workers = o->expect_workers > 0 ? (int)o->expect_workers : 1;
		log_info("listening on %s for %d worker(s)", o->listen, n_workers);
	} else {
		return 0;
	}
	struct cluster_config cfg = {
	    .g = model_get_gguf(m),
	    .spec = &model_get_info(m)->moe,
	    .n_workers = n_workers,
	    .replicas = o->replicas > 0 ? (int)o->replicas : 1,
	    .timeout_ms = o->worker_timeout > 0 ? (int)o->worker_timeout : 10000,
	    .join_timeout_ms = o->listen ? 600000 : 60000,
	    .wire_dtype = !o->wire_dtype		   ? 0
			  : !strcmp(o->wire_dtype, "q8_0") ? KERN_Q8_0
			  : !strcmp(o->wire_dtype, "q8_1") ? KERN_Q8_1
			  : !strcmp(o->wire_dtype, "q8_k") ? KERN_Q8_K
			  : !strcmp(o->wire_dtype, "bf16") ? KERN_BF16
							   : KERN_F32,
	    .stream = o->stream_weights,
	    .balance_window = (double)o->balance_window,
	    .rebalance = o->rebalance,
	    .rebalance_every = (int)o->rebalance_every,
	    .rebalance_threshold = 0.02,
	};
	struct footprint fp;
	if (footprint_measure(model_get_gguf(m), &fp) == 0)
		log_info("coordinator: %.2f GiB of weights stay here (the %.2f GiB of routed "
			 "experts go to the workers), plus KV %.1f MiB per 1K tokens of a sequence",
			 (double)(fp.coordinator_bytes + fp.coordinator_built_bytes) / 1073741824.0,
			 (double)fp.expert_bytes / 1073741824.0,
			 (double)fp.kv_bytes_per_1k / 1048576.0);
	rc = cluster_new(t, &cfg, model_get_pool(m), &cc->c);
	if (rc)
		return rc;
	expert_backend *b = NULL;
	cluster *c = cc->c;
	rc = cluster_backend(c, &b);
	if (rc) {
		cc->c = NULL;
		return rc;
	}
	model_set_experts(m, b);
	return 0;
}

/* --trace-routing: wraps whatever backend the model has in a recorder. */
static int cli_trace_setup(const struct cli_opts *o, model *m, const struct cli_cluster *cc)
{
	if (!o->trace_routing)
		return 0;
	trace_writer *w = NULL;
	int rc = trace_writer_open(o->trace_routing, &w);
	if (rc)
		return rc;
	return trace_attach(m, w, cc->c ? cluster_placement(cc->c) : NULL);
}

static void cli_cluster_stats(const struct cli_opts *o, const struct cli_cluster *cc)
{
	if (o->stats && cc->c)
		cluster_print_stats(cc->c);
}

/* Mean experts per token of every routed layer, on stderr, when routing is
 * not the model's own or --stats asks for it. */
static void cli_route_stats(const struct cli_opts *o, const model *m)
{
	if (!m || (!o->stats && o->route.mode == ROUTE_MODE_TOPK && o->route.n_bias == 0))
		return;
	const struct model_info *info = model_get_info(m);
	const struct route_counts *rc = model_get_route_counts(m);
	int64_t rows = 0, slots = 0;
	for (int l = 0; l < info->n_layer && l < MOE_MAX_LAYERS; l++) {
		if (rc->rows[l] == 0)
			continue;
		fprintf(stderr, "routing: layer %d: %.3f experts per token (%lld rows)\n", l,
			(double)rc->slots[l] / (double)rc->rows[l], (long long)rc->rows[l]);
		rows += rc->rows[l];
		slots += rc->slots[l];
	}
	if (rows > 0)
		fprintf(
		    stderr,
		    "routing: all layers: %.3f experts per token (model: %d), %lld expert rows\n",
		    (double)slots / (double)rows, info->moe.n_expert_used, (long long)slots);
}

/* After the model (and with it the cluster) is destroyed: reap local workers. */
static void cli_cluster_finish(struct cli_cluster *cc)
{
	for (int i = 0; i < cc->n_children; i++) {
		int st;
		for (int tries = 0; tries < 50; tries++) {
			if (waitpid(cc->children[i], &st, WNOHANG) != 0)
				break;
			if (tries == 49) {
				kill(cc->children[i], SIGKILL);
				waitpid(cc->children[i], &st, 0);
			}
			struct timespec ts = {0, 20 * 1000 * 1000};
			nanosleep(&ts, NULL);
		}
	}
	free(cc->children);
	cc->children = NULL;
	cc->n_children = 0;
	cc->c = NULL;
}

/* For subcommands in other files (cli_impl.h): the model with its cluster. */
struct cli_model {
	struct cli_opts o;
	struct cli_cluster cc;
};

int cli_model_open(int argc, char **argv, struct model_params *mp, model **m,
		   struct cli_model **out)
{
	*m = NULL;
	struct cli_model *h = calloc(1, sizeof(*h));
	*out = h;
	if (!h)
		return ERR_NOMEM;
	if (cli_parse(argc, argv, "-m --model --threads -t" CLI_CLUSTER_OPTS, &h->o))
		return ERR_CONFIG;
	if (!h->o.model) {
		log_error("no model given (-m MODEL.gguf)");
		return ERR_CONFIG;
	}
	mp->route = h->o.route;
	mp->kv_f32 = h->o.kv_f32;
	mp->n_threads = (int)h->o.threads;
	int rc = model_open(h->o.model, mp, m);
	if (!rc)
		rc = cli_cluster_setup(&h->o, *m, &h->cc);
	if (!rc)
		rc = cli_trace_setup(&h->o, *m, &h->cc);
	return rc;
}

cluster *cli_model_cluster(struct cli_model *h)
{
	return h ? h->cc.c : NULL;
}

const char *cli_model_usage(void)
{
	return cli_usage_cluster;
}

void cli_model_close(model **m, struct cli_model **hp)
{
	struct cli_model *h = *hp;
	if (h)
		cli_cluster_stats(&h->o, &h->cc);
	model_destroy(m);
	if (h)
		cli_cluster_finish(&h->cc);
	free(h);
	*hp = NULL;
}

/* ------------------------------------------------------------ info */

static const char *cli_usage_info =
    "usage: moefleet info -m MODEL.gguf [--workers N | --worker-memory 64G,64G,...]\n"
    "                     [--node-memory 32G [--ctx-size N]]\n"
    "  Prints the architecture, hyper-parameters, every tensor's\n"
    "  type and size, and the bytes of routed experts versus the rest;\n"
    "  the tensor count and bytes per type, experts and the rest apart; the\n"
    "  files of a split model (give its first shard, NAME-00001-of-0000K.gguf);\n"
    "  then what a cluster needs: coordinator bytes, expert bytes per layer,\n"
    "  KV cache per 1K tokens, and with --workers / --worker-memory the\n"
    "  bytes each worker would hold.  --node-memory plans a cluster of nodes\n"
    "  with that much memory each: per node what it holds (the coordinator:\n"
    "  weights and the KV of one sequence of --ctx-size tokens, default 4096;\n"
    "  each worker: its experts), whether it fits, and how many worker nodes\n"
    "  the experts need.\n";

static void cli_print_kv(const gguf *g, uint64_t i)
{
	const char *key = gguf_kv_key(g, i);
	enum gguf_type t = gguf_kv_type(g, i);
	printf("  %-48s ", key);
	switch (t) {
	case GGUF_TYPE_U16: {
		uint16_t v;
		gguf_get_u16(g, key, &v);
		printf("%u\n", (unsigned)v);
		break;
	}
	case GGUF_TYPE_U32: {
		uint32_t v;
		gguf_get_u32(g, key, &v);
		printf("%u\n", v);
		break;
	}
	case GGUF_TYPE_I32: {
		int32_t v;
		gguf_get_i32(g, key, &v);
		printf("%d\n", v);
		break;
	}
	case GGUF_TYPE_F32: {
		float v;
		gguf_get_f32(g, key, &v);
		printf("%g\n", v);
		break;
	}
	case GGUF_TYPE_BOOL: {
		int v;
		gguf_get_bool(g, key, &v);
		printf("%s\n", v ? "true" : "false");
		break;
	}
	case GGUF_TYPE_STRING: {
		gguf_str s;
		gguf_get_str(g, key, &s);
		int n = s.len > 60 ? 60 : (int)s.len;
		printf("\"%.*s\"%s\n", n, s.ptr, s.len > 60 ? "..." : "");
		break;
	}
	case GGUF_TYPE_ARRAY: {
		enum gguf_type et;
		uint64_t count;
		const void *d;
		gguf_get_arr(g, key, &et, &count, &d);
		printf("[array of %llu]\n", (unsigned long long)count);
		break;
	}
	default: printf("(type %d)\n", (int)t); break;
	}
}

/* Tensors and bytes per tensor type, routed experts (names with "_exps.")
 * and the rest apart. */
static void cli_print_type_mix(const gguf *g)
{
	enum { N_TYPES = 64 };
	uint64_t count[2][N_TYPES] = {{0}}, bytes[2][N_TYPES] = {{0}};
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		int ex = strstr(t->name, "_exps.") != NULL;
		uint32_t ty = t->type < N_TYPES ? t->type : N_TYPES - 1; /* known types are below */
		count[ex][ty]++;
		bytes[ex][ty] += t->n_bytes;
	}
	printf("tensor types:              routed experts              everything else\n");
	printf("  %-8s %8s %16s    %8s %16s\n", "type", "tensors", "bytes", "tensors", "bytes");
	for (uint32_t ty = 0; ty < N_TYPES; ty++) {
		if (!count[0][ty] && !count[1][ty])
			continue;
		printf("  %-8s %8llu %16llu    %8llu %16llu\n", kern_type_name(ty),
		       (unsigned long long)count[1][ty], (unsigned long long)bytes[1][ty],
		       (unsigned long long)count[0][ty], (unsigned long long)bytes[0][ty]);
	}
}

/* The files of a split model: path, tensors and bytes of each shard. */
static void cli_print_shards(const gguf *g)
{
	uint32_t n = gguf_n_shards(g);
	if (n < 2)
		return;
	printf("split into %u files:\n", n);
	for (uint32_t i = 0; i < n; i++)
		printf("  %s: %llu tensors, %llu bytes\n", gguf_shard_path(g, i),
		       (unsigned long long)gguf_shard_n_tensors(g, i),
		       (unsigned long long)gguf_shard_size(g, i));
}

static int cli_info(int argc, char **argv)
{
	struct cli_opts o = {0};
	if (cli_parse(argc, argv, "-m --model --workers --worker-memory --node-memory --ctx-size",
		      &o) ||
	    (!o.help && !o.model)) {
		fputs(cli_usage_info, stderr);
		return CLI_USAGE;
	}
	uint64_t wmem[FOOTPRINT_MAX_WORKERS];
	int n_wmem = 0;
	struct footprint_plan plan = {0, (int)o.ctx_size};
	int n_node = 0;
	if ((o.worker_memory &&
	     footprint_parse_memory(o.worker_memory, wmem, FOOTPRINT_MAX_WORKERS, &n_wmem)) ||
	    (o.node_memory &&
	     footprint_parse_memory(o.node_memory, &plan.node_memory, 1, &n_node))) {
		fputs(cli_usage_info, stderr);
		return CLI_USAGE;
	}
	if (o.help) {
		fputs(cli_usage_info, stdout);
		return CLI_OK;
	}
	kern_init();
	gguf *g = NULL;
	if (gguf_open(o.model, &g))
		return CLI_FAIL;
	char arch[64] = "?";
	gguf_get_cstr(g, "general.architecture", arch, sizeof(arch));
	printf("file: %s (%llu bytes)\narchitecture: %s\nhyper-parameters:\n", o.model,
	       (unsigned long long)gguf_file_size(g), arch);
	size_t al = strlen(arch);
	for (uint64_t i = 0; i < gguf_n_kv(g); i++) {
		const char *k = gguf_kv_key(g, i);
		if (!strncmp(k, arch, al) && k[al] == '.')
			cli_print_kv(g, i);
	}
	printf("other metadata:\n");
	for (uint64_t i = 0; i < gguf_n_kv(g); i++) {
		const char *k = gguf_kv_key(g, i);
		if (!(!strncmp(k, arch, al) && k[al] == '.'))
			cli_print_kv(g, i);
	}
	printf("tensors (%llu):\n", (unsigned long long)gguf_n_tensors(g));
	uint64_t experts = 0, rest = 0;
	for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
		const gguf_tensor *t = gguf_tensor_at(g, i);
		char shape[96];
		int n = 0;
		for (uint32_t d = 0; d < t->n_dims; d++)
			n += snprintf(shape + n, sizeof(shape) - (size_t)n, "%s%llu",
				      d ? " x " : "", (unsigned long long)t->ne[d]);
		printf("  %-40s %-6s %-24s %12llu bytes\n", t->name, kern_type_name(t->type), shape,
		       (unsigned long long)t->n_bytes);
		if (strstr(t->name, "_exps."))
			experts += t->n_bytes;
		else
			rest += t->n_bytes;
	}
	printf("routed experts: %llu bytes (%.1f MiB)\n", (unsigned long long)experts,
	       (double)experts / 1048576.0);
	printf("everything else: %llu bytes (%.1f MiB)\n", (unsigned long long)rest,
	       (double)rest / 1048576.0);
	cli_print_type_mix(g);
	cli_print_shards(g);
	int frc =
	    footprint_report(g, n_wmem ? wmem : NULL, n_wmem ? n_wmem : (int)o.workers, &plan);
	gguf_destroy(&g);
	return frc ? CLI_FAIL : CLI_OK;
}

/* ------------------------------------------------------------ logits */

static const char *cli_usage_logits =
    "usage: moefleet logits -m MODEL.gguf --tokens IDS --out FILE.f32 [--n-prompt P]\n"
    "                       [--threads T]\n"
    "  IDS: comma-separated token ids, or @path to a file of ids separated by commas\n"
    "  or white space.  Writes float32 little-endian logits, one row of n_vocab per\n"
    "  input position.  Positions before P (default: all) are one batch; each later\n"
    "  position is a single-token decode reusing the KV cache.\n";

/* Writes all of buf to a temporary file next to path and renames it into
 * place, so that a failure leaves no partial output. */
static int cli_open_out(const char *path, char **tmp_out, int *fd_out)
{
	size_t n = strlen(path) + 32;
	char *tmp = malloc(n);
	if (!tmp)
		return ERR_NOMEM;
	snprintf(tmp, n, "%s.tmp.%ld", path, (long)getpid());
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		log_error("%s: cannot write: %s", path, strerror(errno));
		free(tmp);
		return ERR_IO;
	}
	*tmp_out = tmp;
	*fd_out = fd;
	return 0;
}

static int cli_write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return ERR_IO;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int cli_logits(int argc, char **argv)
{
	struct cli_opts o = {.n_prompt = -1};
	int rc = CLI_FAIL;
	if (cli_parse(argc, argv,
		      "-m --model --tokens --out -o --n-prompt --threads -t" CLI_CLUSTER_OPTS,
		      &o) ||
	    (!o.help && (!o.model || !o.tokens || !o.out))) {
		fputs(cli_usage_logits, stderr);
		return CLI_USAGE;
	}
	if (o.help) {
		fputs(cli_usage_logits, stdout);
		fputs(cli_usage_cluster, stdout);
		return CLI_OK;
	}
	int32_t *ids = NULL;
	int n = 0;
	model *m = NULL;
	struct cli_cluster cc = {0};
	float *logits = NULL;
	char *tmp = NULL;
	int fd = -1;
	if (cli_read_ids(o.tokens, &ids, &n))
		goto out;
	if (o.n_prompt < 0)
		o.n_prompt = n;
	if (o.n_prompt > n) {
		log_error("--n-prompt %ld is larger than the number of tokens (%d)", o.n_prompt, n);
		goto out;
	}
	struct model_params mp;
	model_params_default(&mp);
	mp.route = o.route;
	mp.kv_f32 = o.kv_f32;
	mp.n_threads = (int)o.threads;
	mp.n_ctx = n;
	if (model_open(o.model, &mp, &m) || cli_cluster_setup(&o, m, &cc) ||
	    cli_trace_setup(&o, m, &cc))
		goto out;
	const struct model_info *info = model_get_info(m);
	for (int i = 0; i < n; i++) {
		if (ids[i] >= info->n_vocab) {
			log_error("token id %d at position %d is out of range (vocabulary %d)",
				  ids[i], i, info->n_vocab);
			goto out;
		}
	}
	logits = malloc((size_t)(unsigned)n * (size_t)info->n_vocab * sizeof(float));
	int32_t *pos = malloc((size_t)(unsigned)n * sizeof(int32_t));
	int32_t *seq = calloc((size_t)(unsigned)n, sizeof(int32_t));
	if (!logits || !pos || !seq) {
		free(pos);
		free(seq);
		log_error("out of memory for %d rows of logits", n);
		goto out;
	}
	for (int i = 0; i < n; i++)
		pos[i] = i;
	if (cli_open_out(o.out, &tmp, &fd)) {
		free(pos);
		free(seq);
		goto out;
	}
	int frc = 0;
	if (o.n_prompt > 0) {
		model_batch b = {(int)o.n_prompt, ids, pos, seq, NULL};
		frc = model_forward(m, &b, logits);
	}
	for (int i = (int)o.n_prompt; i < n && !frc; i++) {
		model_batch b = {1, ids + i, pos + i, seq + i, NULL};
		frc = model_forward(m, &b, logits + (size_t)i * (size_t)info->n_vocab);
	}
	free(pos);
	free(seq);
	if (frc)
		goto out;
	if (cli_write_all(fd, logits, (size_t)n * (size_t)info->n_vocab * sizeof(float)) ||
	    close(fd) != 0) {
		fd = -1;
		log_error("%s: write failed: %s", o.out, strerror(errno));
		goto out;
	}
	fd = -1;
	if (rename(tmp, o.out) != 0) {
		log_error("%s: cannot write: %s", o.out, strerror(errno));
		goto out;
	}
	free(tmp);
	tmp = NULL;
	rc = CLI_OK;
out:
	if (fd >= 0)
		close(fd);
	if (tmp) {
		unlink(tmp);
		free(tmp);
	}
	free(logits);
	free(ids);
	cli_cluster_stats(&o, &cc);
	cli_route_stats(&o, m);
	model_destroy(&m);
	cli_cluster_finish(&cc);
	return rc;
}

/* ------------------------------------------------------------ bench */

static const char *cli_usage_bench =
    "usage: moefleet bench -m MODEL.gguf [--pp 512] [--tg 128] [--reps 5] [--threads T]\n"
    "  pp: one batch of N tokens into an empty context; tg: N single-token decodes,\n"
    "  each producing logits.  Prints medians; the last line is\n"
    "  'bench: ppN X tok/s, tgM Y tok/s'.\n"
    "  --roofline  also print the weight bytes one decoded token reads (attention\n"
    "              and dense, shared experts, the routed experts chosen, head), the\n"
    "              measured read bandwidth of the threads, and the fraction of that\n"
    "              bound the tg speed reaches.\n";

static int cli_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double cli_median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), cli_cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static int cli_bench(int argc, char **argv)
{
	struct cli_opts o = {.pp = 512, .tg = 128, .reps = 5};
	if (cli_parse(argc, argv,
		      "-m --model --pp --tg --reps --threads -t --roofline" CLI_CLUSTER_OPTS, &o) ||
	    (!o.help && !o.model)) {
		fputs(cli_usage_bench, stderr);
		return CLI_USAGE;
	}
	if (o.help) {
		fputs(cli_usage_bench, stdout);
		fputs(cli_usage_cluster, stdout);
		return CLI_OK;
	}
	int rc = CLI_FAIL;
	model *m = NULL;
	struct cli_cluster cc = {0};
	struct model_params mp;
	model_params_default(&mp);
	mp.route = o.route;
	mp.kv_f32 = o.kv_f32;
	mp.n_threads = (int)o.threads;
	mp.n_ctx = (int)(o.pp > o.tg + 1 ? o.pp : o.tg + 1);
	mp.n_batch = o.pp > 0 ? (int)o.pp : 1;
	int n = mp.n_ctx;
	int32_t *ids = malloc((size_t)n * sizeof(int32_t));
	int32_t *pos = malloc((size_t)n * sizeof(int32_t));
	int32_t *seq = calloc((size_t)n, sizeof(int32_t));
	uint8_t *want = calloc((size_t)n, 1);
	double *pp_t = calloc((size_t)o.reps, sizeof(double));
	double *tg_t = calloc((size_t)o.reps, sizeof(double));
	float *logits = NULL;
	if (!ids || !pos || !seq || !want || !pp_t || !tg_t)
		goto out;
	if (model_open(o.model, &mp, &m) || cli_cluster_setup(&o, m, &cc) ||
	    cli_trace_setup(&o, m, &cc))
		goto out;
	const struct model_info *info = model_get_info(m);
	logits = malloc((size_t)info->n_vocab * sizeof(float));
	if (!logits)
		goto out;
	uint64_t st = 12345;
	for (int i = 0; i < n; i++) {
		st = st * 6364136223846793005ULL + 1442695040888963407ULL;
		ids[i] = (int32_t)((st >> 33) % (uint64_t)info->n_vocab);
		pos[i] = i;
	}
	printf("model: %s (%s), threads %d, kernels %s\n", o.model, info->arch,
	       pool_size(model_get_pool(m)), kern_isa_name());
	printf("%-8s %6s %12s %12s\n", "test", "rep", "seconds", "tok/s");
	for (int r = 0; r < o.reps; r++) {
		if (o.pp > 0) {
			model_reset_seq(m, 0);
			want[o.pp - 1] = 1;
			model_batch b = {(int)o.pp, ids, pos, seq, want};
			double t0 = cli_now();
			if (model_forward(m, &b, logits))
				goto out;
			pp_t[r] = cli_now() - t0;
			printf("pp%-6ld %6d %12.4f %12.2f\n", o.pp, r, pp_t[r],
			       (double)o.pp / pp_t[r]);
		}
		if (o.tg > 0) {
			model_reset_seq(m, 0);
			double t0 = cli_now();
			for (int i = 0; i < o.tg; i++) {
				model_batch b = {1, ids + i, pos + i, seq, NULL};
				if (model_forward(m, &b, logits))
					goto out;
			}
			tg_t[r] = cli_now() - t0;
			printf("tg%-6ld %6d %12.4f %12.2f\n", o.tg, r, tg_t[r],
			       (double)o.tg / tg_t[r]);
		}
		fflush(stdout);
	}
	double pp = o.pp > 0 ? (double)o.pp / cli_median(pp_t, (int)o.reps) : 0.0;
	double tg = o.tg > 0 ? (double)o.tg / cli_median(tg_t, (int)o.reps) : 0.0;
	if (o.roofline) {
		struct ops_decode_bytes db;
		ops_decode_bytes(model_get_gguf(m), info->moe.n_expert_used, &db);
		double bw = ops_read_bandwidth(model_get_pool(m), (size_t)512 << 20);
		double bound = bw > 0 ? bw / (double)db.total : 0.0;
		printf("roofline: %.1f MB of weights per decoded token (dense/attention %.1f, "
		       "shared experts %.1f, routed %.1f, head %.1f)\n",
		       (double)db.total / 1e6, (double)db.dense / 1e6, (double)db.shared / 1e6,
		       (double)db.routed / 1e6, (double)db.head / 1e6);
		printf("roofline: read bandwidth %.2f GB/s (%d threads) -> bound %.1f tok/s; "
		       "tg %.2f tok/s = %.2f of the bound (%.2f GB/s of weights)\n",
		       bw / 1e9, pool_size(model_get_pool(m)), bound, tg,
		       bound > 0 ? tg / bound : 0.0, tg * (double)db.total / 1e9);
	}
	printf("bench: pp%ld %.2f tok/s, tg%ld %.2f tok/s\n", o.pp, pp, o.tg, tg);
	rc = CLI_OK;
out:
	free(ids);
	free(pos);
	free(seq);
	free(want);
	free(pp_t);
	free(tg_t);
	free(logits);
	cli_cluster_stats(&o, &cc);
	cli_route_stats(&o, m);
	model_destroy(&m);
	cli_cluster_finish(&cc);
	return rc;
}

/* ------------------------------------------------------------ dispatch */

static const char *cli_usage_main =
    "usage: moefleet <command> [options]\n"
    "commands:\n"
    "  info      print a GGUF model's architecture, hyper-parameters and tensors\n"
    "  logits    write the logits of every position of a token sequence\n"
    "  generate  generate text from a prompt\n"
    "  bench     measure prompt processing and token generation speed\n"
    "  placement simulate  replay a routing trace against placement policies\n"
    "  placement show      draw a layer x expert heatmap of a routing trace\n"
    "  quantize  convert a model's routed experts to MXFP4, Q8_0 or Q4_0\n"
    "  split-experts  write per-node shard files holding each worker's experts\n"
    "  keygen    write a CURVE key pair for authenticated, encrypted cluster links\n"
    "  serve     OpenAI-compatible HTTP server with continuous batching\n"
    "  tokenize  print the token ids of a text\n"
    "Run 'moefleet <command> --help' for the options of a command.\n";

static int cli_generate(int argc, char **argv);

/* Under mpirun every rank runs this program: rank 0 is the coordinator and
 * runs the command; the other ranks serve experts from the -m model. */
static int cli_mpi_start(int argc, char **argv, int *done)
{
	*done = 0;
	if (!transport_mpi_launched())
		return CLI_OK;
	int rank = 0;
	transport *t = NULL;
	if (transport_mpi_new(&rank, &cli_mpi_size, &t)) {
		*done = 1;
		return CLI_FAIL;
	}
	if (rank == 0) {
		cli_mpi = t;
		return CLI_OK;
	}
	*done = 1;
	struct worker_config cfg = {0};
	char name[32];
	snprintf(name, sizeof(name), "mpi-rank-%d", rank);
	cfg.name = name;
	cfg.n_threads = 1;
	for (int i = 1; i + 1 < argc; i++)
		if (!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model"))
			cfg.model_path = argv[i + 1];
	int rc = worker_run(t, &cfg);
	transport_destroy(&t);
	return rc ? CLI_FAIL : CLI_OK;
}

static int cli_dispatch(int argc, char **argv);

int cli_main(int argc, char **argv)
{
	int done;
	int rc = cli_mpi_start(argc, argv, &done);
	if (done)
		return rc;
	rc = cli_dispatch(argc, argv);
	if (cli_mpi) {
		/* the command did not use the workers: release them */
		struct wire_msg m = {.kind = WIRE_SHUTDOWN};
		snprintf(m.u.text, sizeof(m.u.text), "coordinator done");
		uint8_t *buf = NULL;
		size_t cap = 0, len = 0;
		if (wire_encode(&m, &buf, &cap, &len) == 0)
			for (int i = 0; i + 1 < cli_mpi_size; i++)
				transport_send(cli_mpi, i, buf, len, NULL, 0);
		free(buf);
		transport_destroy(&cli_mpi);
	}
	return rc;
}

static int cli_dispatch(int argc, char **argv)
{
	if (argc < 2) {
		fputs(cli_usage_main, stderr);
		return CLI_USAGE;
	}
	const char *cmd = argv[1];
	if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
		fputs(cli_usage_main, stdout);
		return CLI_OK;
	}
	if (!strcmp(cmd, "info"))
		return cli_info(argc - 2, argv + 2);
	if (!strcmp(cmd, "logits"))
		return cli_logits(argc - 2, argv + 2);
	if (!strcmp(cmd, "bench"))
		return cli_bench(argc - 2, argv + 2);
	if (!strcmp(cmd, "placement"))
		return cli_placement(argc - 2, argv + 2);
	if (!strcmp(cmd, "quantize"))
		return cli_quantize(argc - 2, argv + 2);
	if (!strcmp(cmd, "split-experts"))
		return cli_split_experts(argc - 2, argv + 2);
	if (!strcmp(cmd, "keygen"))
		return cli_keygen(argc - 2, argv + 2);
	if (!strcmp(cmd, "serve"))
		return cli_serve(argc - 2, argv + 2);
	if (!strcmp(cmd, "tokenize"))
		return cli_tokenize(argc - 2, argv + 2);
	if (!strcmp(cmd, "generate"))
		return cli_generate(argc - 2, argv + 2);
	fprintf(stderr, "moefleet: unknown command '%s'\n", cmd);
	fputs(cli_usage_main, stderr);
	return CLI_USAGE;
}

/* ------------------------------------------------------------ generate */

static const char *cli_usage_generate =
    "usage: moefleet generate -m MODEL.gguf (--tokens IDS | -p TEXT) -n N [--temp T]\n"
    "                         [--top-k K] [--top-p P] [--seed S] [--print-ids] [--threads T]\n"
    "  Greedy at temperature 0 (the default).  Streams text as it is generated;\n"
    "  --print-ids also prints the generated ids as one comma-separated line.\n";

/* SIGTERM / SIGINT while generating: stop after the current token, so that
 * the cluster shuts down cleanly (every worker is sent Shutdown). */
static volatile sig_atomic_t cli_stop;

static void cli_on_stop(int sig)
{
	cli_stop = sig;
}

static int cli_emit(tokenizer_stream *ts, int32_t id, char *buf, size_t cap)
{
	size_t n = 0;
	if (tokenizer_stream_push(ts, id, buf, cap, &n))
		return ERR_RANGE;
	fwrite(buf, 1, n, stdout);
	fflush(stdout);
	return 0;
}

static int cli_generate(int argc, char **argv)
{
	struct cli_opts o = {.n_predict = -1, .top_p = 1.0};
	if (cli_parse(
		argc, argv,
		"-m --model --tokens -p --prompt -n --n-predict --temp --top-k --top-p --seed "
		"--print-ids --threads -t" CLI_CLUSTER_OPTS,
		&o) ||
	    (!o.help && (!o.model || (!o.tokens == !o.prompt) || o.n_predict < 0))) {
		fputs(cli_usage_generate, stderr);
		return CLI_USAGE;
	}
	if (o.help) {
		fputs(cli_usage_generate, stdout);
		fputs(cli_usage_cluster, stdout);
		return CLI_OK;
	}
	int rc = CLI_FAIL;
	model *m = NULL;
	struct cli_cluster cc = {0};
	tokenizer *tok = NULL;
	tokenizer_stream *ts = NULL;
	sampler *smp = NULL;
	int32_t *ids = NULL, *out_ids = NULL;
	float *logits = NULL;
	char *piece = NULL;
	int n = 0;
	struct model_params mp;
	model_params_default(&mp);
	mp.route = o.route;
	mp.kv_f32 = o.kv_f32;
	mp.n_threads = (int)o.threads;
	/* the model's file is opened first so that a bad file is reported as such */
	if (o.tokens && cli_read_ids(o.tokens, &ids, &n))
		goto out;
	mp.n_ctx = 1; /* set below, once the prompt length is known */
	gguf *g = NULL;
	if (gguf_open(o.model, &g))
		goto out;
	int trc = tokenizer_new(g, &tok);
	gguf_destroy(&g);
	if (trc)
		goto out;
	if (o.prompt) {
		size_t len = strlen(o.prompt), need = 0;
		size_t cap = len + 2;
		ids = malloc(cap * sizeof(int32_t));
		if (!ids)
			goto out;
		size_t off = 0;
		if (tokenizer_add_bos(tok) && tokenizer_bos(tok) >= 0)
			ids[off++] = tokenizer_bos(tok);
		if (tokenizer_encode(tok, o.prompt, len, 1, ids + off, cap - off, &need)) {
			log_error("cannot tokenize the prompt");
			goto out;
		}
		n = (int)(off + need);
		if (n == 0) {
			log_error("the prompt is empty");
			goto out;
		}
	}
	mp.n_ctx = n + (int)o.n_predict;
	if (model_open(o.model, &mp, &m) || cli_cluster_setup(&o, m, &cc) ||
	    cli_trace_setup(&o, m, &cc))
		goto out;
	const struct model_info *info = model_get_info(m);
	for (int i = 0; i < n; i++) {
		if (ids[i] >= info->n_vocab) {
			log_error("token id %d at position %d is out of range (vocabulary %d)",
				  ids[i], i, info->n_vocab);
			goto out;
		}
	}
	struct sampler_params sp = {(float)o.temp, (int)o.top_k, (float)o.top_p, o.seed};
	if (sampler_new(&sp, info->n_vocab, &smp) || tokenizer_stream_new(tok, 0, &ts))
		goto out;
	size_t pcap = tokenizer_stream_bound(ts);
	piece = malloc(pcap);
	logits = malloc((size_t)info->n_vocab * sizeof(float));
	out_ids = malloc(((size_t)o.n_predict + 1) * sizeof(int32_t));
	int32_t *pos = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
	int32_t *seq = calloc((size_t)(n > 0 ? n : 1), sizeof(int32_t));
	uint8_t *want = calloc((size_t)(n > 0 ? n : 1), 1);
	if (!piece || !logits || !out_ids || !pos || !seq || !want) {
		free(pos);
		free(seq);
		free(want);
		goto out;
	}
	for (int i = 0; i < n; i++)
		pos[i] = i;
	want[n - 1] = 1;
	model_batch b = {n, ids, pos, seq, want};
	int frc = model_forward(m, &b, logits);
	free(pos);
	free(seq);
	free(want);
	if (frc)
		goto out;
	if (o.prompt)
		fputs(o.prompt, stdout);
	int n_out = 0;
	double t0 = cli_now();
	signal(SIGTERM, cli_on_stop);
	signal(SIGINT, cli_on_stop);
	for (int i = 0; i < o.n_predict; i++) {
		if (cli_stop) {
			log_error("stopped by signal %d after %d tokens; shutting down",
				  (int)cli_stop, n_out);
			goto out;
		}
		int32_t next = sampler_sample(smp, logits);
		out_ids[n_out++] = next;
		if (cli_emit(ts, next, piece, pcap))
			goto out;
		if (tokenizer_is_eog(tok, next) || i + 1 == o.n_predict)
			break;
		int32_t p = n + i, s0 = 0;
		model_batch d = {1, &next, &p, &s0, NULL};
		if (model_forward(m, &d, logits))
			goto out;
	}
	size_t fl = 0;
	if (tokenizer_stream_flush(ts, piece, pcap, &fl) == 0)
		fwrite(piece, 1, fl, stdout);
	fputc('\n', stdout);
	if (o.print_ids) {
		for (int i = 0; i < n_out; i++)
			printf("%s%d", i ? "," : "", out_ids[i]);
		fputc('\n', stdout);
	}
	fflush(stdout); /* the text before the log line that follows it */
	double dt = cli_now() - t0;
	log_info("generated %d tokens in %.2f s (%.1f tok/s)", n_out, dt,
		 dt > 0 ? (double)n_out / dt : 0.0);
	rc = CLI_OK;
out:
	free(ids);
	free(out_ids);
	free(logits);
	free(piece);
	sampler_destroy(&smp);
	tokenizer_stream_destroy(&ts);
	tokenizer_destroy(&tok);
	cli_cluster_stats(&o, &cc);
	cli_route_stats(&o, m);
	model_destroy(&m);
	cli_cluster_finish(&cc);
	return rc;
}
