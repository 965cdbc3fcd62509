#!/usr/bin/env bash
# A single-node Slurm on this machine, for trying the sbatch templates and for CI.
#
#   scripts/slurm_local.sh start     # installs slurm-wlm and munge with apt if missing, starts
#                                    # munged, slurmctld and slurmd; prints the SLURM_CONF to export
#   eval "$(scripts/slurm_local.sh env)"
#   sbatch --wait --nodes=1 --ntasks=4 --overcommit scripts/eplb.sbatch --transport host
#   scripts/slurm_local.sh status    # exit 0 when all three daemons run and the node is up
#   scripts/slurm_local.sh stop      # cancels the jobs, stops the daemons; nothing is left running
#   scripts/slurm_local.sh install   # only installs the packages (scripts/test.sh, for CI)
#
# Runs as root (the daemons, and the jobs as the submitting user). Everything lives in a private
# directory, $EPLB_SLURM_DIR (default /tmp/eplb-slurm): its own slurm.conf, munge key and socket,
# state, spool, logs and pid files, and its own ports (6917/6918). A system Slurm or munge
# (/etc/slurm, /etc/munge, ports 6817/6818) is neither read nor touched; clients find this one
# through SLURM_CONF, which `env` prints. start and stop are idempotent.
#
# The node: this host, CPUs from nproc, one partition `local` with OverSubscribe=FORCE, so that
# `--overcommit` runs more tasks than CPUs and two job steps (`srun --overlap`) share them.
# MPI: srun --mpi=pmix (Debian's Slurm 22.05 ships pmix_v4; pmi2 fails with Debian's Open MPI).
set -euo pipefail

DIR=${EPLB_SLURM_DIR:-/tmp/eplb-slurm}
CTLD_PORT=${EPLB_SLURM_CTLD_PORT:-6917}
SLURMD_PORT=${EPLB_SLURM_SLURMD_PORT:-6918}
NODE=$(hostname -s)
CONF=$DIR/etc/slurm.conf
SOCKET=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "slurm_local: $*" >&2
  exit 1
}

# pid from a pid file, if that process is alive.
alive() {
  local f=$DIR/run/$1.pid pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

install_packages() {
  local missing=()
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  { command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null 2>&1 || missing+=(slurm-wlm)
  ((${#missing[@]})) || return 0
  echo "# slurm_local: installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d keeps the packages' own munge/slurm services from starting during the install:
  # this script starts private daemons instead.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy && created=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { ((created)) && rm -f $policy; die "apt-get install ${missing[*]} failed"; }
  ((created)) && rm -f $policy
  return 0
}

write_conf() {
  local cpus
  cpus=$(nproc)
  cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a single-node Slurm for tests. Not for production.
ClusterName=eplb-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/etc/plugstack.conf
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
  : >"$DIR/etc/plugstack.conf"
}

start_munge() {
  alive munged >/dev/null && return 0
  if [ ! -s "$DIR/munge/munge.key" ]; then
    (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
  fi
  munged --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force \
    || die "munged did not start; see $DIR/log/munged.log"
}

# wait_for SECONDS COMMAND...: waits up to SECONDS for COMMAND to succeed.
wait_for() {
  local i secs=$1
  shift
  for ((i = 0; i < secs * 2; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

node_state() {
  sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1
}

node_up() {
  [[ "$(node_state)" =~ ^(idle|mixed|allocated) ]]
}

ctld_up() {
  scontrol ping | grep -q UP
}

no_jobs() {
  [ -z "$(squeue -h -o %i)" ]
}

pid_gone() {
  ! kill -0 "$1"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "run as root (the daemons run as root, with a private configuration in $DIR)"
  install_packages
  mkdir -p "$DIR"/{etc,munge,state,spool,log,run}
  chmod 700 "$DIR" "$DIR/munge"
  write_conf
  start_munge
  if ! alive slurmctld >/dev/null; then
    slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  fi
  wait_for 30 ctld_up || die "slurmctld does not answer; see $DIR/log/slurmctld.log"
  if ! alive slurmd >/dev/null; then
    slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start; see $DIR/log/slurmd.log"
  fi
  wait_for 60 node_up || {
    # A node left down or drained by an earlier run: bring it back.
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    wait_for 30 node_up \
      || die "node $NODE is '$(node_state)', not idle; see $DIR/log/slurmd.log and $DIR/log/slurmctld.log"
  }
  echo "# slurm_local: up, node $NODE with $(nproc) CPUs, partition local; now run:"
  echo "export SLURM_CONF=$CONF"
}

# Sends TERM to a daemon, waits up to 15 s, then KILL.
stop_daemon() {
  local pid
  pid=$(alive "$1") || { rm -f "$DIR/run/$1.pid"; return 0; }
  kill "$pid" 2>/dev/null || true
  wait_for 15 pid_gone "$pid" || { kill -9 "$pid" 2>/dev/null || true; sleep 0.5; }
  rm -f "$DIR/run/$1.pid"
}

stop() {
  [ -d "$DIR" ] || { echo "# slurm_local: nothing to stop ($DIR absent)"; return 0; }
  if alive slurmctld >/dev/null && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    squeue -h -o %i | xargs -r scancel --full >/dev/null 2>&1 || true
    wait_for 30 no_jobs || echo "slurm_local: jobs still listed after scancel" >&2
  fi
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon munged
  local left
  left=$(status_lines | grep -c ' running' || true)
  [ "$left" -eq 0 ] || die "still running after stop: $(status_lines | grep ' running')"
  echo "# slurm_local: stopped"
}

status_lines() {
  local d pid
  for d in munged slurmctld slurmd; do
    if pid=$(alive $d); then echo "$d running pid $pid"; else echo "$d stopped"; fi
  done
}

status() {
  status_lines
  local down
  down=$(status_lines | grep -c stopped || true)
  if [ "$down" -eq 0 ]; then
    echo "node $NODE $(node_state)"
    echo "export SLURM_CONF=$CONF"
    node_up && return 0
  fi
  return 3
}

case "${1:-}" in
  install)
    [ "$(id -u)" -eq 0 ] || die "run as root to install slurm-wlm and munge"
    install_packages
    ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) usage ;;
esac
