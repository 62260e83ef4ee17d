/* cli: the moefleet command line (info, logits, generate, bench, quantize,
 * split-experts, placement, keygen, serve, tokenize).
 *
 * cli_main() parses argv, runs one subcommand and returns the process exit
 * status: 0 success, 1 failure (one clear line on stderr), 2 bad usage (usage
 * printed).  It never exits itself; main() does. */
#ifndef MOEFLEET_CLI_H
#define MOEFLEET_CLI_H

int cli_main(int argc, char **argv);

#endif
