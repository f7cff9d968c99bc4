#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of `study run --executor slurm`:
# this host is the controller and the only node. Needs root and Debian's slurm-wlm and munge.
#
#   scripts/slurm_local.sh start DIR   write DIR/slurm.conf, start munged, slurmctld, slurmd;
#                                      prints SLURM_CONF=DIR/slurm.conf once sinfo answers
#   scripts/slurm_local.sh stop DIR    stop the daemons this script started (their pid files in DIR)
set -euo pipefail
action=${1:?usage: slurm_local.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm_local.sh start|stop DIR}")

stop() {
  for daemon in slurmd slurmctld munged; do
    if [ -f "$dir/$daemon.pid" ]; then
      kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
      rm -f "$dir/$daemon.pid"
    fi
  done
}

if [ "$action" = stop ]; then stop; exit 0; fi
[ "$action" = start ] || { echo "usage: slurm_local.sh start|stop DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (slurmd runs jobs as their users)" >&2; exit 1; }
for program in munged slurmctld slurmd sbatch; do
  command -v "$program" >/dev/null || { echo "$program not found: apt-get install slurm-wlm munge" >&2; exit 1; }
done
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
host=$(hostname -s)
# The node as slurmd sees it: its real CPUs, sockets, cores and memory.
node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$host/")
port=${LOCALITYLAB_SLURM_PORT:-6817}
cat > "$dir/slurm.conf" <<CONF
ClusterName=localitylab
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
KillWait=10
MessageTimeout=10
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
trap 'stop' ERR
if ! munge -n >/dev/null 2>&1; then  # no munged answering: start our own
  [ -f /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1 || create-munge-key >/dev/null 2>&1
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  munged --force --pid-file="$dir/munged.pid" 2>/dev/null || munged --force
  [ -f "$dir/munged.pid" ] || pgrep -n -x munged > "$dir/munged.pid"
fi
slurmctld -i -f "$SLURM_CONF"   # -i: ignore any state left by an earlier start
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    echo "SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "SLURM did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
stop
exit 1
