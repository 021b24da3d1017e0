#!/usr/bin/env bash
# Stop the test cluster started by slurm/start.sh: cancel every job first (so no slurmstepd
# outlives slurmd), then TERM each daemon by the PID in its pidfile (KILL after 15 s).
# Never kills by name.
#
#   SLURM_CI_WIPE=1   also drop the accounting DB and wipe Slurm's state and logs. Wipe both or
#                     neither: a fresh StateSaveLocation restarts job ids at 1, and old DB rows
#                     with the same ids confuse sacct (and so submitit).
set -uo pipefail
export PATH="/usr/sbin:/usr/bin:$PATH"
WIPE="${SLURM_CI_WIPE:-0}"

log() { echo "[slurm/stop] $*" >&2; }
[[ $(id -u) -eq 0 ]] || { log "ERROR: must run as root"; exit 1; }

alive() {  # alive PIDFILE COMM
    local pid
    [[ -r $1 ]] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(cat "/proc/$pid/comm") == "$2" ]]
}

stop_pid() {  # stop_pid PIDFILE COMM
    local pid i
    alive "$1" "$2" || return 0
    pid=$(cat "$1")
    log "stopping $2 ($pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.1
    done
    log "$2 ($pid) ignored TERM for 15 s: KILL"
    kill -KILL "$pid" 2>/dev/null || true
}

if alive /run/slurmctld.pid slurmctld; then
    jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u)
    if [[ -n $jobs ]]; then
        log "cancelling $(wc -w <<<"$jobs") job(s)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi

stop_pid /run/slurmd.pid slurmd
stop_pid /run/slurmctld.pid slurmctld
stop_pid /run/slurmdbd.pid slurmdbd
if [[ $WIPE == 1 ]] && alive /run/mysqld/mysqld.pid mariadbd; then
    log "dropping the accounting database"
    mariadb --socket=/run/mysqld/mysqld.sock -e 'DROP DATABASE IF EXISTS slurm_acct_db' || true
fi
stop_pid /run/mysqld/mysqld.pid mariadbd
stop_pid /run/munge/munged.pid munged

if [[ $WIPE == 1 ]]; then
    log "wiping Slurm state and logs"
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*
fi
log "stopped"
