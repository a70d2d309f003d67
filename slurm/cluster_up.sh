#!/usr/bin/env bash
# Start (or confirm) a single-node SLURM cluster: Debian slurm-wlm + munge, run as root, no systemd needed.
#
# Idempotent: daemons that are alive are left alone, and slurm.conf is rewritten (plus `scontrol reconfigure`)
# only when its content changes. Node size comes from `slurmd -C`, so the same script works on any host.
# Exit status 0 once `sinfo` shows the node usable; non-zero with an "error:" line otherwise.
# Environment: SLURM_PARTITION (default "debug"), SLURM_UP_TIMEOUT_S (default 30).
set -euo pipefail

PARTITION="${SLURM_PARTITION:-debug}"
TIMEOUT_S="${SLURM_UP_TIMEOUT_S:-30}"
CONF=/etc/slurm/slurm.conf
die() { echo "cluster_up: error: $*" >&2; exit 1; }

[ "$(id -u)" = "0" ] || die "must run as root (daemons run as root and write under /etc, /run and /var)"

# --- packages ---
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sinfo >/dev/null; then
  command -v apt-get >/dev/null || die "slurm is not installed and apt-get is not available"
  echo "cluster_up: installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed (no network or no apt sources?)"
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || die "apt-get install of slurmctld slurmd slurm-client munge failed"
fi

# --- munge (slurm's authentication) ---
id munge >/dev/null 2>&1 || die "user 'munge' is missing; reinstall the munge package"
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key >/dev/null || die "could not create /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged  # daemonizes; pid in /run/munge/munged.pid
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null 2>&1 || die "munged does not answer; see /var/log/munge/munged.log"

# --- slurm.conf, node line from `slurmd -C` ---
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
HOST=$(hostname)
NODE=$(slurmd -C | head -n1)
[[ "$NODE" == NodeName=* ]] || die "unexpected output from 'slurmd -C': $NODE"
REAL_MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE")
[ -n "$REAL_MEM" ] || die "no RealMemory in 'slurmd -C' output: $NODE"
# Declare ~90% of the memory: a node that reports less than its configured RealMemory is drained.
NODE_LINE="$(sed "s/RealMemory=[0-9]*/RealMemory=$((REAL_MEM * 9 / 10))/" <<<"$NODE") State=UNKNOWN"

NEW_CONF=$(mktemp)
trap 'rm -f "$NEW_CONF"' EXIT
cat >"$NEW_CONF" <<CONF
# Written by slurm/cluster_up.sh: a single-node test cluster.
ClusterName=local
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
${NODE_LINE}
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
  cp "$NEW_CONF" "$CONF"
  chmod 0644 "$CONF"
  CHANGED=1
fi

# --- daemons ---
if alive /run/slurmctld.pid && [ "$CHANGED" = 1 ]; then
  echo "cluster_up: slurm.conf changed, reconfiguring the running daemons"
  scontrol reconfigure || die "scontrol reconfigure failed; run slurm/cluster_down.sh then this script again"
fi
alive /run/slurmctld.pid || slurmctld || die "slurmctld did not start; see /var/log/slurm/slurmctld.log"
alive /run/slurmd.pid || slurmd || die "slurmd did not start; see /var/log/slurm/slurmd.log"

# --- wait until the node takes jobs ---
STATE=""
for _ in $(seq $((TIMEOUT_S * 5))); do
  STATE=$(sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n1 || true)
  case "$STATE" in
    idle|mixed|allocated|completing) break ;;
    drained|draining|down*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
case "$STATE" in
  idle|mixed|allocated|completing) ;;
  *) tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
     die "node $HOST not usable after ${TIMEOUT_S}s (sinfo state: '${STATE:-none}')" ;;
esac
echo "cluster_up: partition ${PARTITION} on ${HOST} is ${STATE} (slurmctld $(cat /run/slurmctld.pid), slurmd $(cat /run/slurmd.pid))"
