/* transport_mpi_none: stands in for transport_mpi.c when configure found no
 * MPI (pkg-config ompi-c): asking for the MPI transport is a configuration
 * error with a clear message. */
#include "transport.h"
#include "err.h"
#include "log.h"

#include <stddef.h>

int transport_mpi_new(int *rank, int *size, transport **out)
{
	(void)rank;
	(void)size;
	*out = NULL;
	log_error("transport: this moefleet was built without MPI (install Open MPI's "
		  "development files, e.g. libopenmpi-dev, and re-run configure)");
	return ERR_CONFIG;
}
