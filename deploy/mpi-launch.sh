#!/usr/bin/env bash
# Runs a moefleet command across the hosts of an Open MPI hostfile: rank 0 is
# the coordinator, the other ranks hold the experts.  Every host needs the
# moefleet binary and the model at the same path (or pass --stream-weights and
# only the coordinator needs the file).
#   deploy/mpi-launch.sh HOSTFILE moefleet generate -m /models/m.gguf -p "Hi" -n 64
set -euo pipefail
hostfile=${1:?usage: mpi-launch.sh HOSTFILE moefleet ARGS...}
shift
np=$(grep -v '^\s*#' "$hostfile" | grep -c .)
extra=()
[ "$(id -u)" -eq 0 ] && extra+=(--allow-run-as-root)
exec mpirun "${extra[@]}" --hostfile "$hostfile" -np "$np" \
	-x OPENBLAS_NUM_THREADS=1 "$@" --transport mpi
