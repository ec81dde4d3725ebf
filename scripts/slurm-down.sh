#!/usr/bin/env bash
# Stop the single-node Slurm cluster that scripts/slurm-up.sh started. Idempotent: with nothing running it does
# nothing and exits 0.
#
#   scripts/slurm-down.sh [--rundir DIR] [--conf FILE] [--purge-state]
#
# 1. cancels every queued or running job and waits up to 20 s for the queue to empty (slurmd leaves running job
#    steps alone when it stops, so they would outlive it);
# 2. stops only the daemons whose PID files slurm-up.sh wrote under $RUNDIR/run, and only if each PID still is
#    that daemon (slurmd, slurmctld, munged or their -wlm names): SIGTERM, up to 20 s, then SIGKILL; munged last,
#    since the Slurm daemons use it while shutting down. A munged that slurm-up.sh found running (e.g. started by
#    systemd) is left alone;
# 3. warns about (does not touch) any slurmstepd still running.
# Packages, config, munge key and logs are kept; --purge-state also deletes $RUNDIR/state and $RUNDIR/spool.
# Environment: LOCAL_SLURM_RUNDIR, LOCAL_SLURM_CONF (as for slurm-up.sh).
set -euo pipefail

RUNDIR=${LOCAL_SLURM_RUNDIR:-/var/lib/nxd-local-slurm}
CONF=${LOCAL_SLURM_CONF:-/etc/slurm/slurm.conf}
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rundir) RUNDIR=$2; shift 2 ;;
        --conf) CONF=$2; shift 2 ;;
        --purge-state) PURGE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "slurm-down: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "slurm-down: error: must run as root; try: sudo $0" >&2; exit 2; }
PATH=$PATH:/usr/sbin:/sbin
export SLURM_CONF=$CONF
log() { echo "slurm-down: $*" >&2; }

# shellcheck source=slurm-daemons.sh
. "$(dirname "$0")/slurm-daemons.sh"

# 1. Cancel the jobs (only if slurmctld is ours and answers).
if running slurmctld && command -v squeue >/dev/null; then
    jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 20 scancel $jobs 2>/dev/null || true
        for _ in $(seq 40); do
            [ -z "$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)" ] && break
            sleep 0.5
        done
    fi
fi

# 2. Stop slurmd and slurmctld together, then munged.
stop_daemons slurmd slurmctld
stop_daemons munged

# 3. Leftover job steps.
left=$(ps -e -o pid=,comm= | awk '$2 ~ /^slurmstepd/ {print $1}' | tr '\n' ' ')
[ -z "$left" ] || log "warning: slurmstepd still running (pids $left); not touched"

if [ "$PURGE" = 1 ] && [ -d "$RUNDIR" ]; then
    rm -rf "${RUNDIR:?}/state" "${RUNDIR:?}/spool"
fi
exit 0
