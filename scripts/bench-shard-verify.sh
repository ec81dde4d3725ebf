#!/usr/bin/env bash
# Benchmarks shard-verify on a 256-file set (tp 32 x pp 8 of the gqa_large fixture): the header-only check, the
# cross-rank check and the full hash pass, next to sha256sum of the same files. Prints a Markdown table.
#
#   scripts/bench-shard-verify.sh [RUNS]      (RUNS: timed runs per row, best kept; default 3)
#
# The set is written once into a temporary directory (removed at exit), so every row runs with the files in the
# page cache: the figures measure CPU and parsing, not the disk.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
runs="${1:-3}"
py="$root/.venv/current/bin/python"
bin="$root/target/release"
model="$root/fixtures/models/gqa_large"

"$py" scripts/gen_fixtures.py fixtures/models --only gqa_large --large-gb 1.5 >&2
if [[ ! -x "$bin/nx-shard" || ! -x "$bin/shard-verify" ]]; then
  cargo build --release -p nx-shard -p shard-verify >&2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
out="$tmp/out"
layout=(--tp 32 --pp 8 --kv-size-multiplier 4 --qkv-linear --fuse-qkv --xser)
"$bin/nx-shard" --input "$model" --output "$out" "${layout[@]}" --quiet >&2
manifest="$out/nx-shard.manifest.jsonl"
files=("$out"/model/*.pt)
bytes=$(cat "${files[@]}" | wc -c)
# Warm the page cache (nx-shard just wrote the files, but make sure).
cat "${files[@]}" > /dev/null

verify=("$bin/shard-verify" "$out" "${layout[@]}" --config "$model/config.json" --quiet)

# best_of CMD...: the smallest wall time over $runs runs, in seconds; the command must succeed.
best_of() {
  local best="" t0 t1 dt
  for _ in $(seq "$runs"); do
    t0=$(date +%s.%N)
    "$@" > /dev/null
    t1=$(date +%s.%N)
    dt=$(echo "$t1 - $t0" | bc -l)
    if [[ -z "$best" ]] || (( $(echo "$dt < $best" | bc -l) )); then best=$dt; fi
  done
  printf '%.3f' "$best"
}

row() {
  local label="$1" read_bytes="$2"; shift 2
  local s
  s=$(best_of "$@")
  local rate="-"
  if [[ "$read_bytes" != 0 ]]; then rate=$(printf '%.2f' "$(echo "$read_bytes / $s / 1000000000" | bc -l)"); fi
  printf '| %s | %s | %s |\n' "$label" "$s" "$rate"
}

echo "256-file set: gqa_large (hidden 2048, 32 q / 8 kv heads, 16 layers) as tp 32 x pp 8, kv size multiplier 4,"
echo "qkv_linear + fuse_qkv, xser; ${#files[@]} files, $(echo "$bytes / 1000000" | bc) MB. $(nproc) cores, files in the page cache,"
echo "best of $runs runs, $(date -u +%Y-%m-%d)."
echo
echo "| command | seconds | GB/s hashed |"
echo "|---|---:|---:|"
row "\`shard-verify --fast\` (names + header-only structure)" 0 "${verify[@]}" --fast
row "\`shard-verify\` (+ cross-rank: norms, kv replicas, vocab rows)" 0 "${verify[@]}"
row "\`shard-verify --fast --manifest\` (+ size and sha256 of every file)" "$bytes" "${verify[@]}" --fast --manifest "$manifest"
row "\`shard-verify --manifest\` (every check)" "$bytes" "${verify[@]}" --manifest "$manifest"
row "\`sha256sum\` of the same files (one process)" "$bytes" sha256sum "${files[@]}"
row "\`xargs -P $(nproc) sha256sum\` of the same files" "$bytes" \
  bash -c 'printf "%s\0" "$@" | xargs -0 -n 16 -P "$(nproc)" sha256sum' _ "${files[@]}"
