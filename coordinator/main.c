/* moefleet: run Mixture-of-Experts models from GGUF files. */
#include "cli/cli.h"

int main(int argc, char **argv)
{
	return cli_main(argc, argv);
}
