#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for the `slurm` tests: munge, MariaDB, slurmdbd (so sacct
# answers), slurmctld and slurmd, started without systemd, every file under one state folder.
#
#   bash tests/slurm/cluster.sh up     [DIR]   # install missing packages, start, wait until usable
#   bash tests/slurm/cluster.sh status [DIR]   # print what runs
#   bash tests/slurm/cluster.sh down   [DIR]   # cancel jobs, stop daemons by pid file
#
# Faults for the chaos soak (python -m harness.soak), on a cluster that is up; jobs keep running through them:
#   bash tests/slurm/cluster.sh restart-ctld [DIR] [DOWN_S]   # stop slurmctld, DOWN_S seconds later start it again
#   bash tests/slurm/cluster.sh stop-slurmd  [DIR]            # stop slurmd (running jobs' slurmstepd go on)
#   bash tests/slurm/cluster.sh start-slurmd [DIR]            # start slurmd again (a no-op when it runs)
#
# DIR defaults to $HARNESS_SLURM_DIR or /tmp/harness-slurm. Clients: `source DIR/env.sh` (exports SLURM_CONF).
# Needs root (daemons run as root) on Debian 12.
set -euo pipefail

cmd="${1:-}"
DIR="$(realpath -m "${2:-${HARNESS_SLURM_DIR:-/tmp/harness-slurm}}")"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

# The cluster. Tests read these back from env.sh and `scontrol show node`, never from a copy
# (only the default DIR is repeated, in conftest.py).
CLUSTER_NAME=harness
NODE=node1
PARTITION=debug
NODE_CPUS=8          # more than the machine has: SlurmdParameters=config_overrides lets jobs share cores
NODE_MEMORY_MB=8000
NODE_GPUS=2          # fake GPUs: character devices, enough to exercise --gpus-per-node
CTLD_PORT=6817
SLURMD_PORT=6818
DBD_PORT=6819
DB_PORT="${HARNESS_SLURM_DB_PORT:-6820}"  # MariaDB on 127.0.0.1 only; not 3306 so a system MariaDB may run
WAIT_S=60            # give up waiting for any one daemon after this long

# Our daemons: each has DIR/run/NAME.pid and NAME in /proc/PID/comm.
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)

die() { echo "cluster.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
pid_file() { echo "$DIR/run/$1.pid"; }

# Prints the pid of daemon $1 if its pid file names a live process of that name.
live_pid() {
  local f pid comm
  f="$(pid_file "$1")"
  [[ -s "$f" ]] || return 1
  pid="$(tr -dc 0-9 < "$f")"
  [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
  comm="$(cat "/proc/$pid/comm")"
  # important: a pid file may outlive its daemon and the pid be reused; check the name.
  [[ "$comm" == "$1"* ]] || return 1
  echo "$pid"
}

# Prints "PORT PID" for each of the SLURM ports held by a listening process.
port_holders() {
  ss -Hltnp 2>/dev/null | awk -v ports=":$CTLD_PORT :$SLURMD_PORT :$DBD_PORT :$DB_PORT" '
    { split($4, a, ":"); port = ":" a[length(a)]
      if (index(" " ports " ", " " port " ") && match($0, /pid=[0-9]+/))
        print substr(port, 2), substr($0, RSTART + 4, RLENGTH - 4) }'
}

# True when every port holder is one of our daemons (pid files under DIR).
ports_ours() {
  local ours=" " d p port pid
  for d in "${DAEMONS[@]}"; do p="$(live_pid "$d")" && ours+="$p "; done
  while read -r port pid; do
    [[ -z "$port" ]] && continue
    [[ "$ours" == *" $pid "* ]] || { echo "port $port is held by pid $pid ($(cat /proc/"$pid"/comm 2>/dev/null))"; return 1; }
  done < <(port_holders)
}

all_running() {
  local d
  for d in "${DAEMONS[@]}"; do live_pid "$d" > /dev/null || return 1; done
}

# Waits until command "$@" succeeds; dies naming $what after WAIT_S.
wait_for() {
  local what="$1"; shift
  local t0; t0="$(now)"
  until "$@" > /dev/null 2>&1; do
    if awk -v a="$t0" -v b="$(now)" -v w="$WAIT_S" 'BEGIN { exit !(b - a > w) }'; then
      die "$what not ready after ${WAIT_S} s; logs in $DIR/log"
    fi
    sleep 0.2
  done
}

install_packages() {
  local missing=() p t0
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
  if (( ${#missing[@]} == 0 )); then echo "packages: all installed"; return; fi
  t0="$(now)"
  echo "packages: installing ${missing[*]}"
  # Keep the packages' init scripts from starting system-wide daemons (Debian's policy-rc.d convention).
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" > "$DIR/log/apt.log" 2>&1 \
    || { (( made_policy )) && rm -f "$policy"; tail -n 20 "$DIR/log/apt.log" >&2; die "apt-get install failed"; }
  (( made_policy )) && rm -f "$policy"
  echo "packages: installed in $(elapsed "$t0") s"
}

write_configs() {
  local munge_sock="$DIR/munge/munge.socket" i gpu_files
  # Fake GPUs: character devices (same numbers as /dev/null). Plain files would allocate but set no
  # CUDA_VISIBLE_DEVICES.
  for (( i = 0; i < NODE_GPUS; i++ )); do
    [[ -c "$DIR/gpu/gpu$i" ]] || mknod -m 666 "$DIR/gpu/gpu$i" c 1 3
  done
  gpu_files="$DIR/gpu/gpu[0-$((NODE_GPUS - 1))]"

  cat > "$DIR/etc/slurm.conf" << EOF
# Written by tests/slurm/cluster.sh; regenerated on every up.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job is held this long before it may start again (default 120 s; < 5 means 120).
AuthInfo=socket=$munge_sock,cred_expire=10
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Defaults add 3 s to every start and about 60 s to every requeue.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=300
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# important: with a non-default munge socket, clients reach slurmdbd only with this line.
AccountingStoragePass=$munge_sock
AccountingStorageTRES=gres/gpu
NodeName=$NODE NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEMORY_MB Gres=gpu:$NODE_GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

  cat > "$DIR/etc/gres.conf" << EOF
NodeName=$NODE Name=gpu File=$gpu_files
EOF

  # slurmdbd refuses a config readable by others: it holds the database password.
  local db_pass
  [[ -s "$DIR/etc/db.pass" ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 > "$DIR/etc/db.pass")
  db_pass="$(cat "$DIR/etc/db.pass")"
  (umask 077; cat > "$DIR/etc/slurmdbd.conf" << EOF
AuthType=auth/munge
AuthInfo=socket=$munge_sock
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pid_file slurmdbd)
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
  )

  cat > "$DIR/env.sh" << EOF
# Source this to use the cluster started by tests/slurm/cluster.sh.
export SLURM_CONF=$DIR/etc/slurm.conf
export HARNESS_SLURM_DIR=$DIR
export HARNESS_SLURM_PARTITION=$PARTITION
export HARNESS_SLURM_NODE=$NODE
EOF
}

start_munge() {
  [[ -s "$DIR/munge/munge.key" ]] || mungekey --create --keyfile="$DIR/munge/munge.key" > /dev/null
  chmod 600 "$DIR/munge/munge.key"
  munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$(pid_file munged)" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
  wait_for munged live_pid munged
  wait_for "munge socket" test -S "$DIR/munge/munge.socket"
}

start_mariadb() {
  local sock="$DIR/mysql/mysqld.sock" fresh=0
  if [[ ! -d "$DIR/mysql/data/mysql" ]]; then
    fresh=1
    mariadb-install-db --user=root --datadir="$DIR/mysql/data" --auth-root-authentication-method=socket \
      --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
  fi
  # mariadbd does not daemonise: detach it into its own session so it outlives this script.
  setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" --socket="$sock" \
    --pid-file="$(pid_file mariadbd)" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=32M --performance-schema=OFF \
    < /dev/null > /dev/null 2>&1 &
  wait_for mariadbd mariadb-admin --no-defaults --socket="$sock" ping
  if (( fresh )); then
    local db_pass; db_pass="$(cat "$DIR/etc/db.pass")"
    mariadb --no-defaults --socket="$sock" -u root << EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
  fi
}

start_slurm() {
  slurmdbd
  wait_for slurmdbd timeout 5 sacctmgr -n list cluster
  # slurmctld must find its cluster registered, or accounting records nothing.
  if [[ -z "$(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=cluster)" ]]; then
    sacctmgr -i add cluster "$CLUSTER_NAME" > /dev/null
  fi
  slurmctld
  slurmd -N "$NODE"
  wait_for "$NODE IDLE" node_idle
  say_resumed
  wait_for sacct sacct -n -X
}

# slurmctld keeps a node's state in $DIR/state across restarts, so a node drained or downed in an earlier run
# (a full disk, a job it could not kill, a stopped slurmd) stays so, and every job pends without an end. This
# cluster is the tests' own: put such a node back. NODE_STATE: the node's State= as last read; RESUMED: the state
# and reason it had when it was resumed.
NODE_STATE=""
RESUMED=""
resume_drained() {
  local show
  show="$(scontrol show node "$NODE")" || return 1
  NODE_STATE="$(grep -oE 'State=[^ ]+' <<< "$show")"
  case "$NODE_STATE" in
    *NOT_RESPONDING*) return 1 ;;  # slurmd has not registered yet: its state is not known
    *DRAIN*|*DOWN*|*FAIL*)
      RESUMED="${NODE_STATE#State=} ($(grep -oE 'Reason=.*' <<< "$show" || echo 'no reason given'))"
      scontrol update nodename="$NODE" state=resume
      return 1 ;;
  esac
}

say_resumed() { [[ -z "$RESUMED" ]] || echo "node $NODE was $RESUMED: resumed"; }

# Succeeds when the node is IDLE and neither drained nor down (`scontrol show node`, not `sinfo -N`, which
# prints one line per partition); resumes a node an earlier run left drained.
node_idle() {
  resume_drained && [[ "$NODE_STATE" =~ ^State=IDLE(\+|$) ]]
}

# A multi-task job's processes meet at the job's first node by name (torch.distributed's MASTER_ADDR comes
# from SLURM_JOB_NODELIST), as on a real cluster; make the test node's name resolve to this machine.
resolve_node() {
  getent hosts "$NODE" > /dev/null && return 0
  echo "127.0.0.1 $NODE  # added by harness tests/slurm/cluster.sh" >> /etc/hosts
}

up() {
  local t0 reason
  t0="$(now)"
  (( EUID == 0 )) || die "up needs root: the daemons run as root and packages may need installing"
  export SLURM_CONF="$DIR/etc/slurm.conf"
  if all_running && ports_ours > /dev/null; then
    resume_drained || true
    say_resumed
    echo "cluster already up in $DIR (source $DIR/env.sh)"
    return 0
  fi
  reason="$(ports_ours)" || die "refusing to start: a foreign SLURM/MariaDB daemon is running ($reason); stop it first"
  if [[ -e "$DIR" && -n "$(ls -A "$DIR")" && ! -e "$DIR/.harness-slurm" ]]; then
    die "refusing to use $DIR: not empty and not made by cluster.sh"
  fi
  # A half-started cluster from a failed up: stop what runs, then start clean.
  stop_daemons > /dev/null
  mkdir -p "$DIR"/{etc,log,run,munge,mysql,gpu,state/slurmctld,state/slurmd}
  touch "$DIR/.harness-slurm"
  # munged refuses a socket folder whose parents are not world-executable.
  chmod 755 "$DIR" "$DIR/munge"
  install_packages
  write_configs
  resolve_node
  local t1; t1="$(now)"
  start_munge;   echo "munge up        $(elapsed "$t1") s"
  start_mariadb; echo "mariadb up      $(elapsed "$t1") s"
  start_slurm;   echo "slurm up        $(elapsed "$t1") s (node $NODE IDLE, sacct answers)"
  echo "cluster up in $(elapsed "$t0") s; clients: source $DIR/env.sh"
}

# TERM daemons "$@" together by their pid files, wait, then KILL. Prints what it stopped.
stop_group() {
  local d pid i t0 pids=() names=()
  t0="$(now)"
  for d in "$@"; do
    pid="$(live_pid "$d")" || continue
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid"); names+=("$d")
  done
  for (( i = 0; i < ${#pids[@]}; i++ )); do
    pid="${pids[i]}"; d="${names[i]}"
    while [[ -d "/proc/$pid" ]] && awk -v a="$t0" -v b="$(now)" 'BEGIN { exit !(b - a < 10) }'; do sleep 0.1; done
    if [[ -d "/proc/$pid" ]]; then kill -KILL "$pid" 2>/dev/null || true; echo "$d: killed (pid $pid) after TERM timed out"
    else echo "$d: stopped (pid $pid) in $(elapsed "$t0") s"; fi
    rm -f "$(pid_file "$d")"
  done
}

# Stops the daemons in dependency order: slurmctld reports to slurmdbd, which needs MariaDB and munge.
stop_daemons() {
  stop_group slurmd slurmctld
  stop_group slurmdbd
  stop_group mariadbd munged
}

# Kills slurmstepd processes started by our slurmd (they hold our SLURM_CONF) that outlived their jobs.
stop_stray_steps() {
  local p pid
  for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
    tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$DIR/etc/slurm.conf" || continue
    kill -KILL "$pid" 2>/dev/null && echo "slurmstepd: killed stray pid $pid"
  done
}

down() {
  local t0; t0="$(now)"
  [[ -e "$DIR/.harness-slurm" ]] || { echo "no cluster in $DIR"; return 0; }
  export SLURM_CONF="$DIR/etc/slurm.conf"
  if live_pid slurmctld > /dev/null; then
    # Cancel jobs first so their processes end with them (slurmstepd survives a stopped slurmd).
    local jobs; jobs="$(squeue -h -o %A 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for (( i = 0; i < 100; i++ )); do [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && break; sleep 0.2; done
    fi
  fi
  stop_daemons
  stop_stray_steps
  echo "cluster down in $(elapsed "$t0") s ($DIR kept: logs, database, state)"
}

status() {
  local d pid rc=0
  [[ -e "$DIR/.harness-slurm" ]] || { echo "no cluster in $DIR"; return 3; }
  for d in "${DAEMONS[@]}"; do
    if pid="$(live_pid "$d")"; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=3; fi
  done
  if (( rc == 0 )); then
    export SLURM_CONF="$DIR/etc/slurm.conf"
    scontrol show node "$NODE" | grep -oE '(State|CfgTRES|Gres)=[^ ]+' || true
    squeue
  fi
  return "$rc"
}

# The fault verbs act on a cluster this script brought up, never on a foreign one.
need_cluster() {
  [[ -e "$DIR/.harness-slurm" ]] || die "no cluster in $DIR"
  export SLURM_CONF="$DIR/etc/slurm.conf"
}

# Stops slurmctld (TERM: it saves its state), waits $1 seconds, starts it again and waits until it answers.
# Jobs keep running on the node: slurmd and slurmstepd do not need the controller until a job ends.
restart_ctld() {
  local down_s="${1:-0}" t0
  [[ "$down_s" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "restart-ctld: DOWN_S='$down_s' is not a number of seconds"
  need_cluster
  t0="$(now)"
  stop_group slurmctld
  sleep "$down_s"
  live_pid slurmctld > /dev/null || slurmctld
  wait_for "slurmctld answering" bash -c "scontrol ping | grep -q UP"
  echo "slurmctld restarted in $(elapsed "$t0") s (down ${down_s} s)"
}

# slurmd alone: the node stops answering the controller, its running jobs go on under slurmstepd.
stop_slurmd() {
  need_cluster
  stop_group slurmd
}

start_slurmd() {
  local t0
  need_cluster
  t0="$(now)"
  if live_pid slurmd > /dev/null; then echo "slurmd: already running"; return 0; fi
  slurmd -N "$NODE"
  wait_for slurmd live_pid slurmd
  echo "slurmd: started in $(elapsed "$t0") s"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  restart-ctld) restart_ctld "${3:-0}" ;;
  stop-slurmd) stop_slurmd ;;
  start-slurmd) start_slurmd ;;
  *) die "unknown command '${cmd}': use up, down, status, restart-ctld, stop-slurmd or start-slurmd (then an optional state folder)" ;;
esac
