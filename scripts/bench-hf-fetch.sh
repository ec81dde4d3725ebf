#!/usr/bin/env bash
# hf-fetch benchmark (make bench): download throughput from the stand-in Hub (scripts/stand_in_hub.py) on
# loopback, side by side with huggingface_hub 2.4 (.venv/current, snapshot_download with local_dir) and
# huggingface_hub 0.36 without and with hf_transfer (.venv/hub036, from scripts/setup-python.sh).
# Cases: one 1 GiB file; 30 x 100 MB; one 1 GiB file with every connection capped (BENCH_CAP_MBS, default 40
# MB/s per connection, the realistic CDN case). Prints a Markdown section on stdout.
# Scale down for a quick run: BENCH_ONE_MB=256 BENCH_N=8 BENCH_MB=50 BENCH_CAP_ONE_MB=256; BENCH_REPEAT=3 for medians;
# BENCH_KEEP=1 keeps the generated data (about 5 GB) for the next run.
# The clients take turns (round-robin over BENCH_REPEAT rounds) and the median is reported.
# Python clients are timed inside the call (interpreter start-up excluded), hf-fetch as a whole process; every
# time includes a final `sync` (hf-fetch fsyncs each file before giving it its final name, the Python clients
# do not), so all contenders pay for getting the bytes to disk alike. MB = 10^6 bytes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/current/bin/python"
py036="$root/.venv/hub036/bin/python"
one_mb="${BENCH_ONE_MB:-1024}"       # MiB, the single-file case
n="${BENCH_N:-30}"
mb="${BENCH_MB:-100}"                # MB (10^6) per file in the many-files case
cap_mbs="${BENCH_CAP_MBS:-40}"       # MB/s per connection in the capped case
cap_one_mb="${BENCH_CAP_ONE_MB:-$one_mb}"
repeat="${BENCH_REPEAT:-1}"
work="${BENCH_DIR:-$root/bench-out}/hf-fetch"
[ -x "$py036" ] || { echo "bench-hf-fetch: $py036 missing: run scripts/setup-python.sh" >&2; exit 2; }
[ -x "$root/target/release/hf-fetch" ] || { echo "bench-hf-fetch: build hf-fetch first (cargo build --release -p hf-fetch)" >&2; exit 2; }
rm -rf "$work/out"
mkdir -p "$work/data/one" "$work/data/many" "$work/data/capped" "$work/out"

make_file() { # path bytes
  if [ ! -f "$1" ] || [ "$(stat -c %s "$1")" != "$2" ]; then
    head -c "$2" /dev/urandom > "$1.tmp" && mv "$1.tmp" "$1"
  fi
}
make_file "$work/data/one/model.safetensors" $((one_mb << 20))
make_file "$work/data/capped/model.safetensors" $((cap_one_mb << 20))
for i in $(seq -f "%05g" 1 "$n"); do
  make_file "$work/data/many/model-$i-of-$(printf %05d "$n").safetensors" $((mb * 1000000))
done
# Stale files from a bigger earlier run would change the case.
find "$work/data/many" -name 'model-*' ! -name "*-of-$(printf %05d "$n").safetensors" -delete
# The generated data's writeback must not overlap the first client's runs.
sync

port_file="$work/port"
rm -f "$port_file"
"$py" "$root/scripts/stand_in_hub.py" --port 0 --port-file "$port_file" --hash-cache "$work/hashes.json" \
  --repo bench/one="$work/data/one" --repo bench/many="$work/data/many" --repo bench/capped="$work/data/capped" \
  > "$work/hub.log" 2>&1 &
hub_pid=$!
trap 'kill "$hub_pid" 2>/dev/null || true' EXIT
for _ in $(seq 600); do [ -s "$port_file" ] && break; sleep 0.1; done
[ -s "$port_file" ] || { cat "$work/hub.log" >&2; exit 1; }
endpoint="http://127.0.0.1:$(cat "$port_file")"
control() { "$py" -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method="POST")).read()' "$endpoint/_control/$1" "$2"; }

export HF_ENDPOINT="$endpoint" HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_DISABLE_TELEMETRY=1
export HF_HOME="$work/hf_home"

# Prints the seconds one download takes; the output is checked for size, then removed.
run_one() { # contender repo
  local who="$1" repo="$2" out="$work/out/dl" t
  rm -rf "$out" "$HF_HOME"
  sync
  case "$who" in
    hf-fetch)
      t=$("$py" -c 'import subprocess, sys, time
t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); print(time.perf_counter() - t)' \
        "$root/target/release/hf-fetch" "$repo" --local-dir "$out" --quiet) ;;
    hub24|hub036|hub036-hf_transfer)
      local interp="$py" transfer=0
      [ "$who" = hub24 ] || interp="$py036"
      [ "$who" = hub036-hf_transfer ] && transfer=1
      t=$(HF_HUB_ENABLE_HF_TRANSFER=$transfer "$interp" -c 'import sys, time
from huggingface_hub import snapshot_download
t = time.perf_counter(); snapshot_download(sys.argv[1], local_dir=sys.argv[2]); print(time.perf_counter() - t)' "$repo" "$out" 2>/dev/null) ;;
  esac
  local t0 t1
  t0=$(date +%s.%N); sync; t1=$(date +%s.%N)
  t=$(echo "$t $t0 $t1" | awk '{printf "%.3f", $1 + $3 - $2}')
  local want got
  want=$(find "$work/data/${repo#bench/}" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s}')
  got=$(find "$out" -path "$out/.cache" -prune -o -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s}')
  [ "$want" = "$got" ] || { echo "bench-hf-fetch: $who on $repo wrote $got bytes, expected $want" >&2; exit 1; }
  rm -rf "$out"
  echo "$t"
}

rows=()
for case in one many capped; do
  if [ "$case" = capped ]; then
    control faults "{\"bandwidth\": $((cap_mbs * 1000000))}"
  else
    control faults '{"bandwidth": 0}'
  fi
  bytes=$(find "$work/data/$case" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s}')
  # Round-robin over the clients, so that a slow spell of the disk's writeback falls on all of them alike.
  declare -A times=()
  for _ in $(seq "$repeat"); do
    for who in hf-fetch hub24 hub036 hub036-hf_transfer; do
      times[$who]+="$(run_one "$who" "bench/$case") "
    done
  done
  for who in hf-fetch hub24 hub036 hub036-hf_transfer; do
    echo "bench-hf-fetch: $case $who ${times[$who]}" >&2
    rows+=("$case|$who|$bytes|${times[$who]% }")
  done
  unset times
done

"$py" - "$cap_mbs" "$repeat" "${rows[@]}" <<'PY'
import statistics, sys
cap, repeat = sys.argv[1], int(sys.argv[2])
rows = [r.split("|") for r in sys.argv[3:]]
names = {"hf-fetch": "hf-fetch (16 connections, 16 MiB ranges)", "hub24": "huggingface_hub 2.4 (httpx)",
         "hub036": "huggingface_hub 0.36 (requests)", "hub036-hf_transfer": "huggingface_hub 0.36 + hf_transfer 0.1.9"}
def label(case, nbytes):
    gb = nbytes / 1e9
    return {"one": f"1 file, {gb:.2f} GB", "many": f"many files, {gb:.2f} GB",
            "capped": f"1 file, {gb:.2f} GB, {cap} MB/s per connection"}[case]
print(f"Median of {repeat} run(s); loopback, 2-core VM; times include a final sync.\n")
print("| case | client | seconds | MB/s | hf-fetch speed-up |")
print("|---|---|---:|---:|---:|")
best = {}
for case, who, nbytes, times in rows:
    t = statistics.median(float(x) for x in times.split())
    best[(case, who)] = t
for case, who, nbytes, times in rows:
    t = best[(case, who)]
    mbs = int(nbytes) / t / 1e6
    speed = best[(case, "hf-fetch")]
    print(f"| {label(case, int(nbytes))} | {names[who]} | {t:.2f} | {mbs:.0f} | {t / speed:.1f}x |")
PY
kill "$hub_pid" 2>/dev/null || true
# The generated data (about 5 GB) is kept only on request, to rerun quickly.
[ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$work"
