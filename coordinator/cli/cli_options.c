/* cli options: what the subcommands share -- parsing options and numbers,
 * reading token ids, setting up the cluster (local, listening or MPI
 * workers), routing traces and statistics, and opening a model with the
 * common options (cli_model_open). */
#define _GNU_SOURCE
#include "cli_impl.h"
#include "../model/attn.h"
#include "../model/footprint.h"
#include "../placement/trace.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../kernels/kern.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

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
void cli_model_params(const struct cli_opts *o, struct model_params *mp)
{
	mp->route = o->route;
	mp->kv_f32 = o->kv_f32;
	mp->kv_shards = (int)o->kv_shards;
	if (o->kv_page > 0)
		mp->kv_page = (int)o->kv_page;
	mp->n_threads = (int)o->threads;
	if (o->batch > 0)
		mp->n_batch = (int)o->batch;
}

int cli_parse(int argc, char **argv, const char *allowed, struct cli_opts *o)
{
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			o->help = 1;
			continue;
		}
		char key[64];
		snprintf(key, sizeof(key), " %s ", a);
		char list[1024];
		snprintf(list, sizeof(list), " %s ", allowed);
		if (a[0] != '-' || !strstr(list, key)) {
			fprintf(stderr, "moefleet: unknown argument '%s'\n", a);
			return -1;
		}
		if (!strcmp(a, "--print-ids")) {
			o->print_ids = 1;
			continue;
		}
		if (!strcmp(a, "--ignore-eos")) {
			o->ignore_eos = 1;
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
		if (!strcmp(a, "--random-kv")) {
			o->random_kv = 1;
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
		} else if (!strcmp(a, "--depth")) {
			if (cli_parse_long(a, v, 0, 1L << 22, &o->depth))
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
		} else if (!strcmp(a, "--kv-workers")) {
			if (cli_parse_long(a, v, 0, 64, &o->kv_workers))
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
		} else if (!strcmp(a, "--kv-shards")) {
			if (cli_parse_long(a, v, 0, 64, &o->kv_shards))
				return -1;
		} else if (!strcmp(a, "--kv-hosts")) {
			if (cli_parse_long(a, v, 0, 64, &o->kv_hosts))
				return -1;
			o->kv_hosts_given = 1;
		} else if (!strcmp(a, "--kv-local-memory")) {
			uint64_t mem = 0;
			int n = 0;
			if (strcmp(v, "0") &&
			    (footprint_parse_memory(v, &mem, 1, &n) || n != 1 || mem > INT64_MAX)) {
				fprintf(stderr, "moefleet: --kv-local-memory: bad size '%s'\n", v);
				return -1;
			}
			o->kv_local = (int64_t)mem;
			o->kv_local_given = 1;
		} else if (!strcmp(a, "--kv-page")) {
			if (cli_parse_long(a, v, 64, 1L << 24, &o->kv_page))
				return -1;
		} else if (!strcmp(a, "--batch")) {
			if (cli_parse_long(a, v, 1, 65536, &o->batch))
				return -1;
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
	if (o->kv_workers > 0 && (o->workers < 1 || o->kv_shards < 1)) {
		fprintf(stderr,
			"moefleet: --kv-workers: KV-only workers beside --workers N (N > 0) "
			"for the pages of --kv-shards V\n");
		return -1;
	}
	return 0;
}

/* Reads token ids: "1,2,3" or "@file" (ids separated by commas or white space). */
int cli_read_ids(const char *spec, int32_t **ids_out, int *n_out)
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

double cli_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char *cli_usage_cluster =
    "cluster options (any command that runs a model):\n"
    "  --workers N            spawn N local expert workers over ZeroMQ ipc://\n"
    "  --kv-workers M         and M local KV-only workers (moefleet-worker --kv-only)\n"
    "                         for the pages of --kv-shards\n"
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
    "                         deepseek4 only)\n"
    "  --kv-shards V          attention in V chains over pages of the context, merged\n"
    "                         in a fixed tree: the same bits in-process and over KV\n"
    "                         hosts, whatever the batch; within float tolerance of\n"
    "                         the default (V: a power of two up to 64; 0: off)\n"
    "  --kv-page P            positions per KV page (default 1024, a multiple of 64)\n"
    "  --kv-hosts N           with a cluster and --kv-shards: the chains' pages live on\n"
    "                         the first N workers (default: as many as can, a power of\n"
    "                         two dividing V; 0: on the coordinator); deepseek4: the\n"
    "                         indexer keys' pages live and are scored there, with the\n"
    "                         bits of the default\n"
    "  --kv-local-memory B    when every KV host is lost, the chains come back here\n"
    "                         if their pages need at most B bytes (default: the\n"
    "                         memory available; 0: never)\n";

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
	const int n_all = (int)(o->workers + o->kv_workers);
	cc->children = calloc((size_t)n_all, sizeof(pid_t));
	if (!cc->children)
		return ERR_NOMEM;
	pid_t parent = getpid();
	for (int i = 0; i < n_all; i++) {
		const int kv_only = i >= o->workers;
		char name[32];
		if (kv_only)
			snprintf(name, sizeof(name), "local-kv-%d", i - (int)o->workers);
		else
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
			if (kv_only)
				args[na++] = "--kv-only";
			else if (!o->stream_weights) { /* without a model copy weights are streamed
							*/
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
int cli_cluster_setup(const struct cli_opts *o, model *m, struct cli_cluster *cc)
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
		n_workers = (int)(o->workers + o->kv_workers);
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
	if (o->kv_shards > 0 && !(o->kv_hosts_given && o->kv_hosts == 0))
		rc = cli_kv_hosts(o, m, c, NULL);
	return rc;
}

int cli_kv_hosts(const struct cli_opts *o, model *m, cluster *c, int *n_hosts)
{
	const struct attn_remote_ops *ops = NULL;
	int n = 0;
	int rc = cluster_kv_hosts(c, (int)o->kv_shards, o->kv_hosts_given ? (int)o->kv_hosts : -1,
				  &ops, &n);
	if (!rc)
		rc = model_set_kv_hosts(m, ops, c, n);
	if (!rc && n_hosts)
		*n_hosts = n;
	return rc;
}

/* Bytes of memory available here (MemAvailable), 0 when unknown. */
static uint64_t cli_mem_available(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	unsigned long long kb = 0;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return (uint64_t)kb * 1024;
}

int cli_kv_rehost(const struct cli_opts *o, model *m, cluster *c, int local_ok, int *n_hosts)
{
	if (!c || !cluster_kv_lost(c))
		return ERR_PEER;
	int rc = cli_kv_hosts(o, m, c, n_hosts);
	if (rc != ERR_CONFIG || !local_ok)
		return rc;
	struct attn_kv_room room;
	model_kv_room(m, &room);
	const uint64_t have = o->kv_local_given ? (uint64_t)o->kv_local : cli_mem_available();
	if (room.local_bytes > have) {
		log_error("the chains' pages need %.1f MiB here, but %.1f MiB are available "
			  "(--kv-local-memory): they stay on no host",
			  (double)room.local_bytes / 1048576.0, (double)have / 1048576.0);
		return rc;
	}
	rc = model_set_kv_hosts(m, NULL, NULL, 0);
	if (!rc) {
		log_warn("no KV host is left: the chains are computed here (%.1f MiB of pages)",
			 (double)room.local_bytes / 1048576.0);
		*n_hosts = 0;
	}
	return rc;
}

/* --trace-routing: wraps whatever backend the model has in a recorder. */
int cli_trace_setup(const struct cli_opts *o, model *m, const struct cli_cluster *cc)
{
	if (!o->trace_routing)
		return 0;
	trace_writer *w = NULL;
	int rc = trace_writer_open(o->trace_routing, &w);
	if (rc)
		return rc;
	return trace_attach(m, w, cc->c ? cluster_placement(cc->c) : NULL);
}

void cli_cluster_stats(const struct cli_opts *o, const struct cli_cluster *cc)
{
	if (o->stats && cc->c)
		cluster_print_stats(cc->c);
}

/* Mean experts per token of every routed layer, on stderr, when routing is
 * not the model's own or --stats asks for it. */
void cli_route_stats(const struct cli_opts *o, const model *m)
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
void cli_cluster_finish(struct cli_cluster *cc)
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
	cli_model_params(&h->o, mp);
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

int cli_model_kv_rehost(struct cli_model *h, model *m, int *n_hosts)
{
	return cli_kv_rehost(&h->o, m, h->cc.c, 1, n_hosts);
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
