#!/usr/bin/env bash
# Start a real single-node Slurm (slurmctld + slurmd, slurmdbd + MariaDB for sacct, munge)
# on loopback, for the `slurm`-marked tests. Idempotent: with everything up and the config
# unchanged it restarts nothing and returns in well under a second.
#
# Needs root (it writes /etc/slurm, /etc/munge, /run and /var/spool and starts daemons).
# Debian bookworm (slurm-wlm 22.05): no systemd is needed, the daemons are started directly.
#
# Knobs (environment):
#   SLURM_CI_CPUS=8          CPUs the node advertises (config_overrides), so several 1-CPU
#                            jobs run at once on a 2-core box; "auto" = what `slurmd -C` sees
#   SLURM_CI_FAKE_GPUS=0     N > 0: declare N fake GPUs (char devices), to test --gres paths
#   SLURM_CI_ACCOUNTING=dbd  dbd (slurmdbd + MariaDB, sacct works) | none
#   SLURM_CI_CLUSTER=ci      ClusterName
#   SLURM_CI_DB_PASS=...     password of the MariaDB user slurmdbd uses (loopback only)
#   SLURM_CI_INSTALL=1       0: fail instead of installing missing packages with apt-get
#   SLURM_CI_TIMEOUT=90      seconds to wait for the node to become idle
set -euo pipefail

CPUS="${SLURM_CI_CPUS:-8}"
FAKE_GPUS="${SLURM_CI_FAKE_GPUS:-0}"
ACCOUNTING="${SLURM_CI_ACCOUNTING:-dbd}"
CLUSTER="${SLURM_CI_CLUSTER:-ci}"
DB_PASS="${SLURM_CI_DB_PASS:-slurm-ci-loopback}"
INSTALL="${SLURM_CI_INSTALL:-1}"
TIMEOUT="${SLURM_CI_TIMEOUT:-90}"

ETC=/etc/slurm
LOGDIR=/var/log/slurm
MYSQL_SOCK=/run/mysqld/mysqld.sock
MYSQL_PID=/run/mysqld/mysqld.pid
MUNGE_PID=/run/munge/munged.pid

log() { echo "[slurm/start] $*" >&2; }
die() {
    log "ERROR: $*"
    for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" "$LOGDIR/slurmdbd.log" /var/log/mysql/ci.err; do
        [[ -f $f ]] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (writes /etc/slurm, /run, /var/spool, starts daemons)"
case "$ACCOUNTING" in dbd|none) ;; *) die "SLURM_CI_ACCOUNTING must be dbd or none, got '$ACCOUNTING'";; esac
[[ $CPUS == auto || $CPUS =~ ^[1-9][0-9]*$ ]] || die "SLURM_CI_CPUS must be a positive integer or 'auto', got '$CPUS'"
[[ $FAKE_GPUS =~ ^[0-9]+$ ]] || die "SLURM_CI_FAKE_GPUS must be a non-negative integer, got '$FAKE_GPUS'"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "SLURM_CI_TIMEOUT must be seconds, got '$TIMEOUT'"

# A daemon is up when its pidfile names a live process with the expected command name.
alive() {  # alive PIDFILE COMM
    local pid
    [[ -r $1 ]] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(cat "/proc/$pid/comm") == "$2" ]]
}

stop_pid() {  # stop_pid PIDFILE COMM: TERM, then KILL after 15 s
    local pid i
    alive "$1" "$2" || return 0
    pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2 end
    shift 2
    end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${limit}s waiting for $what"
        sleep 0.2
    done
}

# --- packages ------------------------------------------------------------------------------
need_pkgs=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [[ -x /usr/sbin/${pair%%:*} ]] || need_pkgs+=("${pair#*:}")
done
if [[ $ACCOUNTING == dbd ]]; then
    [[ -x /usr/sbin/slurmdbd ]] || need_pkgs+=(slurmdbd)
    [[ -x /usr/sbin/mariadbd ]] || need_pkgs+=(mariadb-server)
fi
if ((${#need_pkgs[@]})); then
    [[ $INSTALL == 1 ]] || die "missing packages: ${need_pkgs[*]} (SLURM_CI_INSTALL=0)"
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Daemons must not auto-start from postinst; most containers already block it.
    [[ -e /usr/sbin/policy-rc.d ]] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; }
    apt-get update -qq || log "apt-get update failed; trying the cached lists"
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client \
        $([[ $ACCOUNTING == dbd ]] && echo slurmdbd mariadb-server) >/tmp/slurm-ci-apt.log 2>&1 \
        || { tail -n 30 /tmp/slurm-ci-apt.log >&2; die "apt-get install failed"; }
fi
export PATH="/usr/sbin:/usr/bin:$PATH"

# --- munge ---------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating the munge key"
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! alive "$MUNGE_PID" munged; then
    log "starting munged"
    setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged
    wait_for 10 "munged" bash -c 'munge -n | unmunge'
fi

# --- configuration -------------------------------------------------------------------------
HOST=$(hostname -s)
mkdir -p "$ETC" "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd
hw=$(slurmd -C | head -n 1)
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
mem=$((mem * 95 / 100))
if [[ $CPUS == auto ]]; then
    node_hw=$(sed -e 's/^NodeName=[^ ]* //' -e 's/RealMemory=[0-9]*//' -e 's/UpTime=.*//' <<<"$hw")
    overrides=""
else
    node_hw="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1"
    overrides="SlurmdParameters=config_overrides"
fi
gres_node="" gres_types=""
if ((FAKE_GPUS > 0)); then
    gres_node="Gres=gpu:$FAKE_GPUS"
    gres_types="GresTypes=gpu"
fi

new_conf=$(mktemp)
trap 'rm -f "$new_conf" "${new_gres:-}" "${new_dbd:-}"' EXIT
cat >"$new_conf" <<EOF
# generated by slurm/start.sh: a single-node test cluster on loopback
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups, so no cgroup.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default every job takes the whole node's memory and jobs run one at a time
DefMemPerCPU=1024
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
$(if [[ $ACCOUNTING == dbd ]]; then
    printf '%s\n' AccountingStorageType=accounting_storage/slurmdbd AccountingStorageHost=localhost AccountingStoragePort=6819
else
    printf '%s\n' AccountingStorageType=accounting_storage/none
fi)
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
$gres_types
$overrides
MinJobAge=300
KillWait=5
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 $node_hw RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

changed=0
install_if_changed() {  # install_if_changed NEW DEST MODE
    if ! cmp -s "$1" "$2"; then
        install -m "$3" -o root -g root "$1" "$2"
        changed=1
    fi
}
install_if_changed "$new_conf" "$ETC/slurm.conf" 0644

if ((FAKE_GPUS > 0)); then
    new_gres=$(mktemp)
    for ((i = 0; i < FAKE_GPUS; i++)); do
        [[ -e /dev/slurm-ci-gpu$i ]] || mknod /dev/slurm-ci-gpu$i c 1 3
        echo "Name=gpu File=/dev/slurm-ci-gpu$i" >>"$new_gres"
    done
    install_if_changed "$new_gres" "$ETC/gres.conf" 0644
elif [[ -e $ETC/gres.conf ]]; then
    rm -f "$ETC/gres.conf"
    changed=1
fi

# --- accounting: MariaDB (unix socket only) + slurmdbd -------------------------------------
if [[ $ACCOUNTING == dbd ]]; then
    install -d -o mysql -g mysql -m 0755 /run/mysqld /var/log/mysql
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising MariaDB"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=socket \
            >/var/log/mysql/install.log 2>&1 || { tail -n 20 /var/log/mysql/install.log >&2; die "mariadb-install-db failed"; }
    fi
    if ! alive "$MYSQL_PID" mariadbd; then
        log "starting mariadbd"
        setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$MYSQL_SOCK" \
            --pid-file="$MYSQL_PID" --log-error=/var/log/mysql/ci.err </dev/null >/dev/null 2>&1 &
        wait_for 30 "mariadbd" mariadb --socket="$MYSQL_SOCK" -e 'SELECT 1'
    fi
    mariadb --socket="$MYSQL_SOCK" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
    new_dbd=$(mktemp)
    cat >"$new_dbd" <<EOF
# generated by slurm/start.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
EOF
    dbd_changed=0
    cmp -s "$new_dbd" "$ETC/slurmdbd.conf" || { install -m 0600 -o root -g root "$new_dbd" "$ETC/slurmdbd.conf"; dbd_changed=1; }
    if ((dbd_changed)) && alive /run/slurmdbd.pid slurmdbd; then
        log "slurmdbd.conf changed: restarting slurmdbd"
        stop_pid /run/slurmdbd.pid slurmdbd
    fi
    if ! alive /run/slurmdbd.pid slurmdbd; then
        log "starting slurmdbd"
        /usr/sbin/slurmdbd
        wait_for 30 "slurmdbd on port 6819" bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'
    fi
fi

# --- slurmctld + slurmd --------------------------------------------------------------------
if ((changed)); then
    log "slurm.conf changed: (re)starting slurmctld and slurmd"
    stop_pid /run/slurmd.pid slurmd
    stop_pid /run/slurmctld.pid slurmctld
fi
if ! alive /run/slurmctld.pid slurmctld; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
if ! alive /run/slurmd.pid slurmd; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# --- wait until the node takes jobs (and the cluster is registered for sacct) --------------
end=$((SECONDS + TIMEOUT))
resumed=0
while :; do
    state=$(sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        *inval*) sinfo -R >&2 || true; die "node $HOST is INVAL: its slurm.conf hardware exceeds what slurmd sees" ;;
        drain*|down*|drained*)
            if ((!resumed)); then
                log "node $HOST is $state: resuming it once"
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi ;;
    esac
    ((SECONDS < end)) || { sinfo -R >&2 || true; die "node $HOST not idle after ${TIMEOUT}s (state: '${state:-none}')"; }
    sleep 0.2
done
if [[ $ACCOUNTING == dbd ]]; then
    registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }
    until registered; do
        ((SECONDS < end)) || die "cluster '$CLUSTER' not registered in slurmdbd after ${TIMEOUT}s"
        sleep 0.3
    done
fi
log "ready: node $HOST ${state}, cluster $CLUSTER, accounting $ACCOUNTING"
