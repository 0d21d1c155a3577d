#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the `hpo launch slurm` tests: 2 CPUs, no GPU.
#
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root. Writes
# /etc/slurm/slurm.conf, makes sure a munge key exists, starts munged, slurmctld and slurmd, and
# exits 0 once `sinfo` answers with the node idle. Idempotent: a cluster that already answers is
# left alone. Plugins that need no cgroups (proctrack/linuxproc, task/none), so it also runs in
# containers and sandboxes.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
LOG=/var/log/slurm

up() { timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | grep -qE "^${NODE} (idle|mix|alloc)"; }

for tool in sinfo slurmctld slurmd munged; do
  command -v "$tool" >/dev/null 2>&1 || { echo "slurm-up: $tool not found (apt-get install slurm-wlm munge)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "slurm-up: must run as root" >&2; exit 1; }
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG" /run/munge /var/lib/munge /var/log/munge
WANTED=$(cat <<EOF
# Written by .ci/slurm-up.sh: a one-node test cluster on ${NODE}.
ClusterName=hpo-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
# A requeued task may start again after the credential lifetime (default 120 s): short for the tests.
AuthInfo=cred_expire=10
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd.log
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ "$(cat "$CONF" 2>/dev/null)" = "$WANTED" ] && up; then echo "slurm-up: cluster already up"; exit 0; fi
printf '%s\n' "$WANTED" > "$CONF"

if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- munged
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi

# A stale daemon from an earlier configuration would not pick up this one: restart both.
for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    pid=$(cat "$pidfile"); kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
done
slurmctld
slurmd

for _ in $(seq 60); do
  if up; then sinfo; echo "slurm-up: cluster up"; exit 0; fi
  # A node left DOWN by an earlier run comes back here.
  scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm-up: the cluster did not answer within 60 s; logs in $LOG" >&2
tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
exit 1
