#!/usr/bin/env bash
# A real one-node SLURM cluster on this host (slurmctld + slurmd + slurmdbd/MariaDB + munge) for
# tests/test_slurm.py and for trying profiles/slurm by hand. Debian 12, as root, no systemd needed.
#
#   tests/slurm/cluster.sh install   apt packages (idempotent)
#   tests/slurm/cluster.sh start     write config, (re)start every daemon, wait until the node is idle
#   tests/slurm/cluster.sh stop      stop every daemon this script started
#   tests/slurm/cluster.sh status    daemons, node state and queue
#
# Config, databases, spool and logs live under $TINYLM_SLURM_STATE (default /tmp/tinylm-slurm).
# Clients find the cluster through links /etc/slurm/{slurm,gres,cgroup}.conf into that folder; an
# existing non-link /etc/slurm/slurm.conf is never touched (start refuses instead).
# The node advertises one fake GPU (gres gpu:fake:1, File=/dev/null) so GPU jobs can be scheduled.
set -euo pipefail

STATE=${TINYLM_SLURM_STATE:-/tmp/tinylm-slurm}
CLUSTER=tinylm
ACCOUNT=tinylm
DB_PORT=${TINYLM_SLURM_DB_PORT:-3307}
HOST=$(hostname -s)
CONF=$STATE/etc
LOG=$STATE/log
RUN=$STATE/run
ETC_SLURM=/etc/slurm
export SLURM_CONF=$CONF/slurm.conf

die() { echo "cluster.sh: error: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*"; }

# die naming a daemon and showing the end of its log
die_daemon() {
    local name=$1 logfile=$2 why=$3
    echo "cluster.sh: error: $name $why; last lines of $logfile:" >&2
    tail -n 20 "$logfile" >&2 2>/dev/null || echo "  (no log written)" >&2
    exit 1
}

# wait_for SECONDS COMMAND...: retry COMMAND every 0.2 s until it succeeds or time runs out
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

need_root() { [[ $(id -u) == 0 ]] || die "run as root (the daemons run as root, munge and mysql)"; }

cmd_install() {
    need_root
    local pkgs=(slurm-wlm munge slurmdbd mariadb-server) missing=() p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        local aptlog=${TMPDIR:-/tmp}/tinylm-slurm-apt.log
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >"$aptlog" 2>&1 || { tail -n 20 "$aptlog" >&2; die "apt-get update failed"; }
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$aptlog" 2>&1 \
            || { tail -n 20 "$aptlog" >&2; die "apt-get install ${missing[*]} failed (log: $aptlog)"; }
    fi
    say "installed: $(slurmctld -V), munge $(dpkg-query -W -f='${Version}' munge), $(mariadbd --version | cut -d' ' -f2-4)"
}

write_config() {
    local cpus mem_mib
    cpus=$(nproc)
    # leave 512 MiB for the daemons themselves
    mem_mib=$(awk '/^MemTotal:/ {print int($2 / 1024) - 512}' /proc/meminfo)
    mkdir -p "$CONF" "$LOG" "$RUN" "$STATE/ctld" "$STATE/slurmd"

    cat >"$CONF/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster. Do not use for anything real.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# no cgroups here (containers, CI): track processes by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
# finished jobs stay visible to squeue for 10 minutes (status polling without sacct)
MinJobAge=600
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib Gres=gpu:fake:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# the same node under a time limit, as many clusters' short or debug partitions: tests ask for more
PartitionName=short Nodes=ALL MaxTime=30 State=UP
EOF

    cat >"$CONF/gres.conf" <<EOF
# one fake GPU: jobs asking for --gpus=1 get CUDA_VISIBLE_DEVICES=0 and no device
AutoDetect=off
NodeName=$HOST Name=gpu Type=fake File=/dev/null
EOF

    cat >"$CONF/cgroup.conf" <<EOF
# cgroups are not used (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none in slurm.conf)
CgroupAutomount=no
EOF

    cat >"$CONF/slurmdbd.conf" <<EOF
# Written by tests/slurm/cluster.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=tinylm-test
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF/slurmdbd.conf"

    # clients (sinfo, sbatch, and srun inside jobs, which drop SLURM_CONF) read /etc/slurm
    mkdir -p "$ETC_SLURM"
    local f
    for f in slurm.conf gres.conf cgroup.conf slurmdbd.conf; do
        if [[ -e $ETC_SLURM/$f && ! -L $ETC_SLURM/$f ]]; then
            die "$ETC_SLURM/$f exists and is not ours; this script only runs on a host without a SLURM setup"
        fi
        ln -sfn "$CONF/$f" "$ETC_SLURM/$f"
    done
}

# /proc, not kill -0: status also works for users who may not signal root's daemons
pid_alive() { [[ -s $1 ]] && [[ -d /proc/$(cat "$1") ]]; }

# stop_pidfile NAME PIDFILE: TERM, wait up to 10 s, then KILL
stop_pidfile() {
    local name=$1 pidfile=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        if ! wait_for 10 bash -c "! kill -0 $pid"; then
            say "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
            wait_for 5 bash -c "! kill -0 $pid" || die "$name (pid $pid) does not exit"
        fi
    fi
    rm -f "$pidfile"
}

start_munge() {
    if pid_alive /run/munge/munged.pid && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # shared with anything else on this host; left running by stop
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --force >"$LOG/munged.out" 2>&1 \
        || die_daemon munged /var/log/munge/munged.log "did not start"
    wait_for 10 bash -c "munge -n | unmunge" || die_daemon munged /var/log/munge/munged.log "does not answer"
}

start_mariadb() {
    local db=$STATE/mysql sock=$STATE/run/mysqld.sock
    if [[ ! -d $db/mysql ]]; then
        mkdir -p "$db"
        chown mysql:mysql "$db"
        mariadb-install-db --user=mysql --datadir="$db" --auth-root-authentication-method=socket \
            >"$LOG/mariadb-install.log" 2>&1 || die_daemon mariadb-install-db "$LOG/mariadb-install.log" "failed"
    fi
    chown mysql:mysql "$RUN"
    touch "$LOG/mariadb.log" && chown mysql:mysql "$LOG/mariadb.log"  # written by mariadbd as mysql
    # setsid: detach from the caller's session so the server outlives this script and its terminal
    setsid mariadbd --no-defaults --user=mysql --datadir="$db" --socket="$sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/mariadb.pid" \
        --log-error="$LOG/mariadb.log" --skip-log-bin </dev/null >/dev/null 2>&1 &
    wait_for 30 mariadb-admin --socket="$sock" ping || die_daemon mariadb "$LOG/mariadb.log" "does not answer"
    mariadb --socket="$sock" -u root <<EOF || die "could not create the slurm database in MariaDB"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'tinylm-test';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'tinylm-test';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

node_state() { sinfo -h -N -o %t 2>/dev/null | head -n1; }

cmd_start() {
    need_root
    command -v slurmctld >/dev/null && command -v mariadbd >/dev/null \
        || die "SLURM or MariaDB is not installed; run: $0 install"
    local t0=$SECONDS
    cmd_stop quiet
    write_config
    start_munge

    start_mariadb
    slurmdbd || die_daemon slurmdbd "$LOG/slurmdbd.log" "did not start"
    wait_for 30 sacctmgr -n list cluster || die_daemon slurmdbd "$LOG/slurmdbd.log" "does not answer sacctmgr"
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi

    # -c: forget jobs from an earlier start (their state folder may be half gone)
    slurmctld -c -f "$CONF/slurm.conf" || die_daemon slurmctld "$LOG/slurmctld.log" "did not start"
    wait_for 30 scontrol ping || die_daemon slurmctld "$LOG/slurmctld.log" "does not answer scontrol ping"
    slurmd -f "$CONF/slurm.conf" || die_daemon slurmd "$LOG/slurmd.log" "did not start"
    local deadline=$((SECONDS + 60)) state=""
    while state=$(node_state); [[ $state != idle ]]; do
        case $state in
            down* | drain* | fail*)
                scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        if ((SECONDS > deadline)); then
            pid_alive "$RUN/slurmd.pid" || die_daemon slurmd "$LOG/slurmd.log" "exited"
            die_daemon slurmd "$LOG/slurmd.log" "node $HOST is '${state:-unknown}', not idle, after 60 s"
        fi
        sleep 0.2
    done

    # accounts only after slurmctld is up: sacctmgr otherwise waits 60 s per call for it
    if ! sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" >/dev/null || die "sacctmgr add account failed"
    fi
    if [[ -z $(sacctmgr -n -P list assoc user=root account="$ACCOUNT" format=user) ]]; then
        sacctmgr -i add user root account="$ACCOUNT" >/dev/null || die "sacctmgr add user root failed"
        sacctmgr -i modify user root set defaultaccount="$ACCOUNT" >/dev/null \
            || die "sacctmgr could not make $ACCOUNT root's default account"
    fi
    say "cluster '$CLUSTER' up in $((SECONDS - t0)) s: node $HOST idle, $(nproc) CPUs, gres gpu:fake:1"
    say "state and logs in $STATE; stop with: $0 stop"
}

cmd_stop() {
    local quiet=${1:-}
    # jobs first, so nothing is left running without a slurmd
    if pid_alive "$RUN/slurmctld.pid"; then
        scancel --full --quiet --user=root 2>/dev/null || true
    fi
    stop_pidfile slurmd "$RUN/slurmd.pid"
    stop_pidfile slurmctld "$RUN/slurmctld.pid"
    stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
    stop_pidfile mariadb "$RUN/mariadb.pid"  # SIGTERM is a clean shutdown
    # munged may serve other SLURM users on this host; it is cheap to leave running
    [[ $quiet == quiet ]] || say "stopped slurmd, slurmctld, slurmdbd and mariadb (munged left running)"
}

cmd_status() {
    local name rc=0
    for name in slurmctld slurmd slurmdbd mariadb; do
        if pid_alive "$RUN/$name.pid"; then
            echo "$name: running (pid $(cat "$RUN/$name.pid"))"
        else
            echo "$name: not running"; rc=1
        fi
    done
    if pid_alive /run/munge/munged.pid; then echo "munged: running"; else echo "munged: not running"; rc=1; fi
    if ((rc == 0)); then
        sinfo -N -o "%N %t %c %m %G" && squeue
    fi
    return $rc
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status   (state in \$TINYLM_SLURM_STATE, default /tmp/tinylm-slurm)" >&2; exit 2 ;;
esac
