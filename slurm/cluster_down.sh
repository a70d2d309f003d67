#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by cluster_up.sh: daemons are stopped by their PID files only.
#
# Job state in /var/spool/slurmctld is kept, so job ids keep increasing across restarts (a wiped state restarts
# ids at 1, and submitit log folders named by job id would then collide). Pass --purge to wipe it anyway.
set -uo pipefail
[ "$(id -u)" = "0" ] || { echo "cluster_down: error: must run as root" >&2; exit 1; }
for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || continue
  kill "$pid" && echo "cluster_down: sent TERM to $pid ($f)"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && { echo "cluster_down: error: $pid ($f) still alive after 10 s" >&2; exit 1; }
done
if [ "${1:-}" = "--purge" ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
  echo "cluster_down: wiped job state"
fi
exit 0
