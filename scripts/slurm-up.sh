#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster (Debian's slurmctld + slurmd + munge), without systemd, for the
# integration tests (tests/compat/test_slurm.py) and for trying the Slurm recipes locally. Idempotent: a second
# run while everything is up does nothing (about 0.1 s); a changed configuration restarts the Slurm daemons.
#
#   scripts/slurm-up.sh [--cpus N] [--mem-mb N] [--node NAME] [--partition NAME] [--proctrack linuxproc|pgid]
#                       [--min-job-age S] [--timeout S] [--rundir DIR] [--conf FILE] [--no-install]
#
# Every option has an environment variable with the same meaning (LOCAL_SLURM_CPUS, LOCAL_SLURM_MEM_MB,
# LOCAL_SLURM_NODE, LOCAL_SLURM_PARTITION, LOCAL_SLURM_PROCTRACK, LOCAL_SLURM_MIN_JOB_AGE, LOCAL_SLURM_TIMEOUT,
# LOCAL_SLURM_RUNDIR, LOCAL_SLURM_CONF). Defaults: all CPUs (nproc), 90 % of MemTotal, the short host name,
# partition "debug", proctrack/linuxproc (no cgroups needed), MinJobAge 300, 90 s to wait for the node,
# state under /var/lib/nxd-local-slurm, config /etc/slurm/slurm.conf (Debian's compiled-in default, so sbatch,
# srun, sinfo work without SLURM_CONF).
#
# Needs root (slurmd must start jobs as the submitting user). Installs the packages with apt-get when they are
# missing (slurmctld slurmd slurm-client munge, --no-install-recommends: 8 packages, about 3.5 MB), blocking the
# install-time service starts with a temporary policy-rc.d. Logs: $RUNDIR/log/. Stop with scripts/slurm-down.sh.
# Exit status: 0 the node is idle (or mixed/allocated), 1 it did not come up in time (log tails are printed),
# 2 usage error or not root.
set -euo pipefail

die() { echo "slurm-up: error: $*" >&2; exit "${2:-1}"; }
log() { echo "slurm-up: $*" >&2; }

CPUS=${LOCAL_SLURM_CPUS:-}
MEM_MB=${LOCAL_SLURM_MEM_MB:-}
NODE=${LOCAL_SLURM_NODE:-}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
PROCTRACK=${LOCAL_SLURM_PROCTRACK:-linuxproc}
MIN_JOB_AGE=${LOCAL_SLURM_MIN_JOB_AGE:-300}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-90}
RUNDIR=${LOCAL_SLURM_RUNDIR:-/var/lib/nxd-local-slurm}
CONF=${LOCAL_SLURM_CONF:-/etc/slurm/slurm.conf}
INSTALL=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cpus) CPUS=$2; shift 2 ;;
        --mem-mb) MEM_MB=$2; shift 2 ;;
        --node) NODE=$2; shift 2 ;;
        --partition) PARTITION=$2; shift 2 ;;
        --proctrack) PROCTRACK=$2; shift 2 ;;
        --min-job-age) MIN_JOB_AGE=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --rundir) RUNDIR=$2; shift 2 ;;
        --conf) CONF=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "slurm-up: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as the submitting user); try: sudo $0" 2
case "$PROCTRACK" in linuxproc|pgid) ;; *) die "--proctrack must be linuxproc or pgid" 2 ;; esac
for v in TIMEOUT MIN_JOB_AGE; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "${v,,} must be a whole number of seconds" 2
done

# --- 1. packages ------------------------------------------------------------------------------------------------
missing=0
for c in slurmctld slurmd slurmstepd sbatch srun sinfo squeue scontrol munged munge unmunge mungekey; do
    command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || { missing=1; break; }
done
if [ "$missing" = 1 ]; then
    [ "$INSTALL" = 1 ] || die "Slurm or munge is not installed and --no-install was given"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get: install slurmctld, slurmd, slurm-client and munge (Debian/Ubuntu package names)"
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    policy=/usr/sbin/policy-rc.d
    temp_policy=0
    if [ "$(cat /proc/1/comm 2>/dev/null)" != systemd ] && [ ! -e "$policy" ]; then
        # Keep the packages' maintainer scripts from starting munged/slurmd through /etc/init.d: we start them.
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; temp_policy=1
        trap '[ "$temp_policy" = 1 ] && rm -f "$policy"' EXIT
    fi
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
            slurmctld slurmd slurm-client munge
    }
    if ! apt_install >"${TMPDIR:-/tmp}/slurm-up.apt.log" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q -o DPkg::Lock::Timeout=300 >>"${TMPDIR:-/tmp}/slurm-up.apt.log" 2>&1 || true
        apt_install >>"${TMPDIR:-/tmp}/slurm-up.apt.log" 2>&1 \
            || { tail -n 20 "${TMPDIR:-/tmp}/slurm-up.apt.log" >&2; die "apt-get install slurmctld slurmd slurm-client munge failed"; }
    fi
    if [ "$temp_policy" = 1 ]; then rm -f "$policy"; temp_policy=0; fi
fi
PATH=$PATH:/usr/sbin:/sbin

# --- 2. configuration ---------------------------------------------------------------------------------------------
[ -n "$NODE" ] || NODE=$(hostname -s 2>/dev/null || hostname); NODE=${NODE%%.*}
[ -n "$CPUS" ] || CPUS=$(nproc)
if [ -z "$MEM_MB" ]; then
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    MEM_MB=$(( mem_kb * 9 / 10 / 1024 / 100 * 100 ))
    [ "$MEM_MB" -ge 100 ] || MEM_MB=100
fi
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive whole number" 2
[[ $MEM_MB =~ ^[1-9][0-9]*$ ]] || die "--mem-mb must be a positive whole number" 2

install -d -m 0755 "$RUNDIR" "$RUNDIR/spool" "$RUNDIR/log" "$RUNDIR/run"
install -d -m 0700 "$RUNDIR/state"
install -d -m 0755 "$(dirname "$CONF")"

MARK="# generated by scripts/slurm-up.sh (nxd tools local Slurm) - do not edit, regenerate instead"
new_conf=$(mktemp "$(dirname "$CONF")/.slurm.conf.XXXXXX")
trap 'rm -f "$new_conf"; [ "${temp_policy:-0}" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
cat >"$new_conf" <<EOF
$MARK
ClusterName=localci
# "localhost" is accepted by slurmctld as "this host": no dependence on DNS.
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$RUNDIR/state
SlurmdSpoolDir=$RUNDIR/spool
SlurmctldPidFile=$RUNDIR/run/slurmctld.pid
SlurmdPidFile=$RUNDIR/run/slurmd.pid
SlurmctldLogFile=$RUNDIR/log/slurmctld.log
SlurmdLogFile=$RUNDIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups at all: process tracking through /proc (or process groups), no task binding.
ProctrackType=proctrack/$PROCTRACK
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$RUNDIR/log/jobcomp.log
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# CI friendliness: the node never stays DOWN/DRAINED over a hardware mismatch, jobs with impossible dependencies
# are cancelled instead of pending forever, scancel and time limits take ~5 s instead of 30 s.
ReturnToService=2
SlurmdParameters=config_overrides
DependencyParameters=kill_invalid_depend
# Reject at once (instead of leaving PENDING forever) jobs asking for more CPUs or nodes than this cluster has.
EnforcePartLimits=ALL
KillWait=5
MinJobAge=$MIN_JOB_AGE
InactiveLimit=0
# Start pending batch jobs and array tasks right away instead of in 3 s waves.
SchedulerParameters=batch_sched_delay=0
# There is no /bin/mail.
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
if [ -f "$CONF" ] && cmp -s "$new_conf" "$CONF"; then
    rm -f "$new_conf"
else
    if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
        backup="$CONF.before-slurm-up.$(date +%Y%m%d-%H%M%S)"
        cp -p "$CONF" "$backup"
        log "kept the existing $CONF (not generated by this script) as $backup"
    fi
    chmod 0644 "$new_conf"
    mv -f "$new_conf" "$CONF"
    changed=1
fi
trap '[ "${temp_policy:-0}" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
if [ "$CONF" != /etc/slurm/slurm.conf ]; then
    log "note: export SLURM_CONF=$CONF for sbatch, srun, sinfo and the tests"
fi
export SLURM_CONF=$CONF

# shellcheck source=slurm-daemons.sh
. "$(dirname "$0")/slurm-daemons.sh"
wait_pidfile() {  # name: up to 10 s for the daemon to write its PID file
    local i
    for i in $(seq 100); do running "$1" && return 0; sleep 0.1; done
    return 1
}
tails() {
    echo "--- sinfo -N -l" >&2; timeout 10 sinfo -N -l >&2 2>&1 || true
    for f in slurmctld.log slurmd.log munged.log slurmctld.stdout slurmd.stdout; do
        [ -f "$RUNDIR/log/$f" ] && { echo "--- tail $RUNDIR/log/$f" >&2; tail -n 25 "$RUNDIR/log/$f" >&2; }
    done
    return 0
}

# --- 3. munge -----------------------------------------------------------------------------------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if ! munge_ok; then
    touch "$RUNDIR/log/munged.log"; chown munge:munge "$RUNDIR/log/munged.log"; chmod 0640 "$RUNDIR/log/munged.log"
    origin=()
    getent hosts "$NODE" >/dev/null 2>&1 || origin=(--origin=127.0.0.1)
    # A stale socket or PID file from a killed munged makes a new one refuse to start.
    if [ -s /run/munge/munged.pid ] && ! is_daemon "$(cat /run/munge/munged.pid)" munged; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    runuser -u munge -- munged --log-file="$RUNDIR/log/munged.log" "${origin[@]}" \
        </dev/null >>"$RUNDIR/log/munged.stdout" 2>&1 || true
    for i in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || { tails; die "munged did not start (see $RUNDIR/log/munged.log)"; }
    cp /run/munge/munged.pid "$RUNDIR/run/munged.pid"
    log "started munged"
fi

# --- 4. slurmctld, slurmd -----------------------------------------------------------------------------------------
if [ "$changed" = 1 ]; then
    stop_daemons slurmd slurmctld
fi
started=()
if ! running slurmctld; then
    rm -f "$RUNDIR/run/slurmctld.pid"
    slurmctld -c -f "$CONF" </dev/null >>"$RUNDIR/log/slurmctld.stdout" 2>&1 || true
    wait_pidfile slurmctld || { tails; die "slurmctld did not start (see $RUNDIR/log/slurmctld.log)"; }
    started+=(slurmctld)
fi
if ! running slurmd; then
    rm -f "$RUNDIR/run/slurmd.pid"
    slurmd -c -N "$NODE" -f "$CONF" </dev/null >>"$RUNDIR/log/slurmd.stdout" 2>&1 || true
    wait_pidfile slurmd || { tails; die "slurmd did not start (see $RUNDIR/log/slurmd.log)"; }
    started+=(slurmd)
fi
[ ${#started[@]} -eq 0 ] || log "started ${started[*]} (config $CONF, state and logs under $RUNDIR)"

# --- 5. wait for the node -----------------------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT)); t0=$SECONDS; resumed=0; state=
while :; do
    state=$(timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle*|mixed*|allocated*|completing*) break ;;
        *drain*|*down*|*inval*|*fail*)
            if [ $resumed = 0 ] && [ $((SECONDS - t0)) -ge 5 ]; then
                timeout 10 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; resumed=1
            fi ;;
    esac
    if [ $SECONDS -ge $deadline ]; then
        tails; die "node $NODE is not idle after ${TIMEOUT}s (state: ${state:-no answer})"
    fi
    sleep 0.5
done
echo "slurm-up: node $NODE is $state ($CPUS CPUs, ${MEM_MB} MB, partition $PARTITION); stop with scripts/slurm-down.sh"
