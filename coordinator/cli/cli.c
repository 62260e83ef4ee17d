/* cli: the entry of the command line -- the command list, the start under
 * mpirun (rank 0 coordinates, the other ranks serve experts), and the
 * dispatch to each subcommand (cli_options.c, cli_info.c, cli_run.c,
 * cli_tools.c, cli_keys.c, cli_serve.c). */
#define _GNU_SOURCE
#include "cli.h"
#include "cli_impl.h"
#include "../../worker/worker.h"
#include "../../common/transport.h"
#include "../../common/wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

transport *cli_mpi; /* set when started under mpirun (rank 0) */
int cli_mpi_size;

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
