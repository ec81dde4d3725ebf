# Sourced by slurm-up.sh and slurm-down.sh: the daemons they started, found by the PID files under $RUNDIR/run
# and checked to still be that daemon before anything is signalled. The sourcing script defines RUNDIR and log().

is_daemon() {  # pid name: true if PID is the daemon NAME (Debian installs them as NAME-wlm)
    local pid=$1 name=$2 comm exe
    [[ $pid =~ ^[0-9]+$ ]] && [ -d "/proc/$pid" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    exe=$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null || true)")
    [ "$comm" = "$name" ] || [ "$comm" = "$name-wlm" ] || [ "$exe" = "$name" ] || [ "$exe" = "$name-wlm" ]
}

running() {  # name: true if the PID in $RUNDIR/run/name.pid is that daemon
    local f="$RUNDIR/run/$1.pid"
    [ -s "$f" ] && is_daemon "$(cat "$f")" "$1"
}

stop_daemons() {  # names...: SIGTERM together, wait up to 20 s, SIGKILL stragglers, remove the PID files
    local n p pids=() deadline
    for n in "$@"; do
        if running "$n"; then pids+=("$(cat "$RUNDIR/run/$n.pid"):$n"); fi
    done
    for p in "${pids[@]}"; do kill -TERM "${p%%:*}" 2>/dev/null || true; done
    deadline=$((SECONDS + 20))
    for p in "${pids[@]}"; do
        while is_daemon "${p%%:*}" "${p##*:}" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        if is_daemon "${p%%:*}" "${p##*:}"; then
            log "${p##*:} (pid ${p%%:*}) ignored SIGTERM for 20 s: SIGKILL"
            kill -KILL "${p%%:*}" 2>/dev/null || true
        fi
    done
    for n in "$@"; do rm -f "$RUNDIR/run/$n.pid"; done
    [ ${#pids[@]} -eq 0 ] || log "stopped ${pids[*]##*:}"
}
