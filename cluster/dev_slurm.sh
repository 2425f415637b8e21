#!/usr/bin/env bash
# A real Slurm cluster on this machine for development and the tests: munge, mariadb, slurmdbd, slurmctld,
# slurmd, all under one folder, started without systemd or cgroups. One node; DEV_SLURM_NODES=2 makes it two
# (the host name and `localhost`, both resolving to this machine; one slurmd each), for multi-node jobs.
#
#   eval "$(cluster/dev_slurm.sh start)"     # prints: export SLURM_CONF=DIR/slurm.conf
#   sbatch ... / ablate.py --executor slurm ...
#   cluster/dev_slurm.sh stop                # stops only the daemons it started (by their pid files)
#   cluster/dev_slurm.sh install             # only install the missing Debian packages (CI does it beside pip)
#
# DIR is $DEV_SLURM_DIR, default /tmp/dev_slurm-$UID. Missing Debian packages are installed (root only): slurmctld
# slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core (-core: no system perl upgrade).
# Accounting (slurmdbd + a mariadb made by mariadb-install-db in DIR) is what lets sacct, and so submitit, see
# jobs that were cancelled or died before writing a result. 'start' on a running cluster prints the same line.
# Exit codes: 0 started (or already running); 3 Slurm is missing and cannot be installed (not root); 1 failed
# (the line names the daemon and its log).
set -euo pipefail

DIR=${DEV_SLURM_DIR:-/tmp/dev_slurm-$(id -u)}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core)
COMMANDS=(slurmctld slurmd sbatch munged slurmdbd mariadbd mariadb-install-db mariadb)
DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)       # start is the reverse order
START_TIMEOUT=${DEV_SLURM_TIMEOUT:-90}                     # seconds for each daemon to answer
NODES=${DEV_SLURM_NODES:-1}
APT_GET="$(dirname "${BASH_SOURCE[0]}")/apt_get.sh"     # waits for another apt-get (CI installs beside pip)

say() { echo "dev_slurm: $*" >&2; }
fail() { say "$*"; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin"

pid_files() {   # pid_files NAME: the pid files of NAME's daemons (slurmd: one per node, slurmd-NODE.pid)
    local pid_file
    for pid_file in "$DIR/run/$1.pid" "$DIR/run/$1"-*.pid; do [[ -s $pid_file ]] && echo "$pid_file"; done
    return 0
}

alive() {   # alive NAME: a pid file of NAME names a live process
    local pid_file
    for pid_file in $(pid_files "$1"); do kill -0 "$(cat "$pid_file")" 2>/dev/null && return 0; done
    return 1
}

node_names() {   # the cluster's node names, one per line: the host name, then localhost for a second node
    hostname -s
    ((NODES == 2)) && echo localhost
    return 0
}

wait_for() {   # wait_for NAME COMMAND...: until COMMAND succeeds, or the daemon died / the timeout passed
    local name=$1; shift
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then fail "$name did not answer within ${START_TIMEOUT} s; see $DIR/log/$name.log"; fi
        sleep 0.2
    done
}

ensure_packages() {
    local missing=()
    for command in "${COMMANDS[@]}"; do command -v "$command" >/dev/null || missing+=("$command"); done
    ((${#missing[@]} == 0)) && return 0
    if (($(id -u) != 0)); then
        say "Slurm is not installed (${missing[*]} missing) and installing it needs root: apt-get install ${PACKAGES[*]}"
        exit 3
    fi
    say "installing ${PACKAGES[*]}"
    { bash "$APT_GET" update -qq && bash "$APT_GET" install -y -qq "${PACKAGES[@]}"; } \
        >"${TMPDIR:-/tmp}/dev_slurm_apt.log" 2>&1 || fail "apt-get install failed; see ${TMPDIR:-/tmp}/dev_slurm_apt.log"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() {
    local host user node ctld_port dbd_port db_port names ports
    host=$(hostname -s)
    user=$(id -un)
    # Sockets, CoresPerSocket, ThreadsPerCore must match the machine, or slurmd is drained: take slurmd's own.
    node=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]*//' -e 's/RealMemory=[0-9]*//')
    ctld_port=$(free_port); dbd_port=$(free_port); db_port=$(free_port)
    names=$(node_names | paste -sd,)
    ports=$(for _ in $(node_names); do free_port; done | paste -sd,)     # one slurmd per node: each its own port
    mkdir -p "$DIR"/{run,log,state,spool,munge,mysql}
    chmod 711 "$DIR/munge"          # munged: the socket folder must be searchable
    echo "$db_port" >"$DIR/mysql.port"
    cat >"$DIR/slurm.conf" <<EOF
# Written by cluster/dev_slurm.sh: a cluster on this one machine without systemd, cgroups or mail.
ClusterName=dev
SlurmctldHost=$host
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$ctld_port
SlurmdPort=${ports%%,*}
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Jobs start about 1 s after submission instead of 3 s; an impossible request fails at sbatch, not pending forever.
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
# sacct needs accounting: submitit asks it for jobs that are no longer in the queue.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStoragePass=$DIR/munge/munge.socket     # the munge socket for slurmdbd (AuthInfo is not used there)
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$names NodeHostname=$host NodeAddr=127.0.0.1 Port=$ports $node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=$user
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"     # slurmdbd refuses a readable one (it holds the password)
}

start_munge() {
    [[ -s $DIR/munge/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
                                      chmod 400 "$DIR/munge/munge.key"; }
    munged --force --key-file "$DIR/munge/munge.key" --socket "$DIR/munge/munge.socket" \
        --pid-file "$DIR/run/munged.pid" --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/munged.seed" \
        || fail "munged did not start; see $DIR/log/munged.log"
    wait_for munged munge -n -S "$DIR/munge/munge.socket"
}

start_mariadb() {
    if [[ ! -d $DIR/mysql/mysql ]]; then
        mariadb-install-db --user="$(id -un)" --datadir="$DIR/mysql" --skip-test-db >"$DIR/log/mariadb.log" 2>&1 \
            || fail "mariadb-install-db failed; see $DIR/log/mariadb.log"
    fi
    mariadbd --no-defaults --user="$(id -un)" --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" \
        --port="$(cat "$DIR/mysql.port")" --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" \
        --log-error="$DIR/log/mariadb.log" --skip-log-bin --innodb-buffer-pool-size=32M >/dev/null 2>&1 &
    wait_for mariadb mariadb --no-defaults --socket="$DIR/run/mysql.sock" -u root -e "SELECT 1"
    mariadb --no-defaults --socket="$DIR/run/mysql.sock" -u root -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
        || fail "could not create the accounting database user; see $DIR/log/mariadb.log"
}

start() {
    ensure_packages
    if alive slurmctld && alive slurmd; then
        echo "export SLURM_CONF=$DIR/slurm.conf"
        return 0
    fi
    stop 2>/dev/null || true
    write_config
    export SLURM_CONF=$DIR/slurm.conf
    start_munge
    start_mariadb
    slurmdbd || fail "slurmdbd did not start; see $DIR/log/slurmdbd.log"
    wait_for slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster dev >/dev/null 2>&1 || true     # fails harmlessly if it is registered already
    slurmctld || fail "slurmctld did not start; see $DIR/log/slurmctld.log"
    wait_for slurmctld scontrol ping
    for name in $(node_names); do
        slurmd -N "$name" || fail "slurmd did not start; see $DIR/log/slurmd-$name.log"
    done
    wait_for slurmd nodes_idle
    echo "export SLURM_CONF=$DIR/slurm.conf"
}

nodes_idle() {   # every node has registered and can take jobs
    local states
    states=$(sinfo -h -N -o %T)
    (($(wc -l <<<"$states") == NODES)) && ! grep -qvE '^(idle|mix|alloc)' <<<"$states"
}

stop() {
    # SIGTERM to every daemon at once, then wait for all: each takes 2-4 s to exit, so one by one took ~12 s.
    local pid_file pid pids=()
    for name in "${DAEMONS[@]}"; do
        for pid_file in $(pid_files "$name"); do
            pid=$(cat "$pid_file")
            if kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null; then
                pids+=("$pid")
            fi
            rm -f "$pid_file"
        done
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    done
    return 0
}

case "${1:-}" in
    start) [[ $NODES == 1 || $NODES == 2 ]] || fail "DEV_SLURM_NODES=$NODES: 1 or 2 (the second node is localhost)"
           start ;;
    stop) stop ;;
    install) ensure_packages ;;
    *) echo "usage: $0 start|stop|install   (folder: \$DEV_SLURM_DIR, default /tmp/dev_slurm-\$UID; nodes: \$DEV_SLURM_NODES, 1 or 2)" >&2
       exit 2 ;;
esac
