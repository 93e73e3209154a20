#!/usr/bin/env bash
# A real one-machine SLURM cluster for the tests (tests/test_slurm.py), shaped like a GPU server
# so that profiles/slurm schedules unchanged: 32 CPUs, 256 GB and stand-in GPUs are declared
# (SlurmdParameters=config_overrides), while jobs share the machine's real cores. Two stand-in
# GPUs by default (LOUPE_SLURM_GPUS): two single-threaded GPU jobs at a time on 2 cores.
#
#   tests/slurm/cluster.sh start [PARTITION...]   install if missing, configure, start, wait
#   tests/slurm/cluster.sh stop                   stop what `start` started
#   tests/slurm/cluster.sh status                 exit 0 when the node accepts jobs
#
# Needs root (apt, /etc/slurm, mknod, daemons); exits 77 when SLURM is missing and cannot be
# installed. Partitions default to every `slurm_partition` named in profiles/slurm/profile.yaml;
# they are created on the node beside the default partition `debug`. Debian's slurm-wlm 22.05 reads /etc/slurm/slurm.conf: the jobstep strips
# SLURM_* variables (SLURM_CONF included) before `srun`, so the config cannot live elsewhere.
# A slurm.conf this script did not write is never touched.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROFILE=${LOUPE_SLURM_PROFILE:-$HERE/../../profiles/slurm/profile.yaml}
STATE=${LOUPE_SLURM_STATE:-/tmp/loupe-slurm}
CONF_DIR=/etc/slurm
MARK="# written by loupe tests/slurm/cluster.sh"
HOST=$(hostname -s)
GPUS=${LOUPE_SLURM_GPUS:-2}

say() { echo "cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }

install_packages() {
    # Exit status 77 (the tests skip on it) only when SLURM is missing and cannot be installed.
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
    [ "$(id -u)" = 0 ] || { say "slurm-wlm and munge are missing, and installing them needs root"; exit 77; }
    command -v apt-get >/dev/null || { say "slurm-wlm and munge are missing, and there is no apt-get"; exit 77; }
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >"$STATE/apt.log" 2>&1; then
        say "apt-get could not install slurm-wlm and munge: $(tail -n 1 "$STATE/apt.log")"
        exit 77
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
    # As the munge user, like its service unit; remembered so that `stop` ends only ours.
    runuser -u munge -- munged --force
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munged does not answer"
    cat /run/munge/munged.pid >"$STATE/munged.pid"
}

profile_partitions() {
    # Every `slurm_partition: NAME` in the profile (comments and quotes dropped).
    [ -f "$PROFILE" ] || return 0
    sed -n 's/#.*//; s/^[[:space:]]*slurm_partition:[[:space:]]*//p' "$PROFILE" \
        | tr -d "\"' " | grep -v '^$' | sort -u
}

write_config() {
    if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script: not touching it"
    fi
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/spool"
    # Stand-in GPUs: gres/gpu needs device files, and their count must match Gres=gpu:N.
    for i in $(seq 0 $((GPUS - 1))); do
        [ -e "/dev/fakegpu$i" ] || mknod "/dev/fakegpu$i" c 1 3
    done
    cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=loupe-test
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# squeue is the status command without accounting: finished jobs must stay visible for longer
# than the plugin's status interval (it falls back to sacct below 3x that interval), and for
# the tests' \`scontrol show job\` checks after a run.
MinJobAge=3600
# A cancelled job gets SIGTERM, then SIGKILL this many seconds later.
KillWait=5
# The node declares the hardware below, not what it finds (a GPU server's shape).
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$HOST CPUs=32 RealMemory=256000 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/gres.conf" <<EOF
$MARK
NodeName=$HOST Name=gpu File=/dev/fakegpu[0-$((GPUS - 1))]
EOF
}

node_ready() {
    # Bounded: without a controller, sinfo retries for a long time.
    local state
    state=$(timeout 5 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1) || return 1
    case "$state" in idle | mix | alloc) return 0 ;; *) return 1 ;; esac
}

daemon() {
    # In the foreground (-D) under our own pid, so that `stop` ends exactly what we started.
    local name=$1
    setsid "$name" -D </dev/null >>"$STATE/$name.out" 2>&1 &
    echo $! >"$STATE/$name.ours"
}

wait_for() {
    # wait_for SECONDS CMD...: until CMD succeeds.
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.3
    done
}

start() {
    mkdir -p "$STATE"
    install_packages
    if [ -f "$STATE/slurmctld.ours" ] && node_ready; then say "already running"; else
        stop >/dev/null 2>&1
        write_config
        start_munge
        daemon slurmctld
        wait_for 30 timeout 5 scontrol ping >/dev/null 2>&1 \
            || die "slurmctld did not start: $(tail -n 3 "$STATE/slurmctld.log" 2>&1)"
        daemon slurmd
        wait_for 60 node_ready \
            || die "node $HOST is not idle: $(timeout 5 sinfo -h -N -o '%t %E' 2>&1); $(tail -n 3 "$STATE/slurmd.log" 2>&1)"
    fi
    local parts=("$@")
    [ ${#parts[@]} -gt 0 ] || mapfile -t parts < <(profile_partitions)
    for p in "${parts[@]}"; do
        scontrol show partition "$p" >/dev/null 2>&1 \
            || scontrol create PartitionName="$p" Nodes="$HOST" MaxTime=INFINITE State=UP
    done
    say "node $HOST up; partitions: $(sinfo -h -o %P | tr '\n' ' ')"
}

stop_pid() {
    # SIGTERM, then SIGKILL after 10 s (slurmd ignores SIGTERM while it cannot reach slurmctld).
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        wait_for 10 bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

no_jobs() { [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]; }

stop() {
    # Jobs first, and until their steps are gone (slurmstepd kills them after KillWait), then
    # the daemons, the config and the stand-in GPUs this script made.
    if [ -f "$STATE/slurmctld.ours" ]; then
        timeout 10 scancel --quiet --user "$(id -un)" 2>/dev/null || true
        wait_for 20 no_jobs || say "jobs still listed after 20 s"
    fi
    stop_pid "$STATE/slurmd.ours"
    stop_pid "$STATE/slurmctld.ours"
    stop_pid "$STATE/munged.pid"
    # The controller's saved state (jobs, partitions created at run time) would come back.
    rm -rf "$STATE/ctld" "$STATE/spool"
    for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
        if [ -f "$f" ] && grep -qF "$MARK" "$f"; then rm -f "$f"; fi
    done
    rm -f /dev/fakegpu[0-9]*
    say "stopped"
}

case "${1:-}" in
start) shift; start "$@" ;;
stop) stop ;;
status) node_ready ;;
*) die "usage: $0 start [PARTITION...] | stop | status" ;;
esac
