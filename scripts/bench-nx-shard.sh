#!/usr/bin/env bash
# nx-shard benchmark (make bench): the seed's layout (tp 32, pp 8, kv multiplier 4, qkv_linear, fuse_qkv, xser;
# 256 files) on a generated Llama-shaped bf16 checkpoint, side by side with `cp -r` of the same checkpoint (the
# I/O floor) and with the seed's Python path (from_pretrained + torch.save of the full state, then a faithful
# Python model of NxD's converter, tests/reference/nxd_reference.py). Prints a Markdown section on stdout.
# BENCH_GB sets the model size (default 1.5); the page cache is warm for every contender alike. cp -r and nx-shard
# are bound by the disk's writeback, whose speed varies from run to run by up to 1.5x here, so they run
# BENCH_REPEAT times (default 3), interleaved, and the run with the median time is reported.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/current/bin/python"
gb="${BENCH_GB:-1.5}"
work="${BENCH_DIR:-$root/bench-out}/nx-shard-$gb"
model="$root/fixtures/models/gqa_large_$gb"
rm -rf "$work"
mkdir -p "$work"
if [ ! -f "$model/.complete" ]; then
  "$py" "$root/scripts/gen_fixtures.py" "$work/gen" --only gqa_large --large-gb "$gb" >&2
  rm -rf "$model"
  mv "$work/gen/gqa_large" "$model"
fi
bytes=$(du -sb "$model" | cut -f1)
flags=(--tp 32 --pp 8 --kv-size-multiplier 4 --qkv-linear --fuse-qkv --xser)
measure() { # label, command...
  local label="$1"; shift
  sync
  local r
  r=$("$py" "$root/scripts/peak_mem.py" --json -- bash -c '"$@" >&2 && sync' _ "$@")
  echo "$label|$r"
}
cat "$model"/*.safetensors > /dev/null # warm the page cache for everyone
median() { # label, results (one JSON per line): the result with the median seconds, and every run's seconds
  "$py" -c 'import json, sys
runs = sorted((json.loads(l) for l in sys.argv[2].splitlines()), key=lambda r: r["seconds"])
best = dict(runs[len(runs) // 2], runs=[round(r["seconds"], 2) for r in runs])
print(sys.argv[1] + "|" + json.dumps(best))' "$1" "$2"
}
cp_runs="" nx_runs=""
for _ in $(seq "${BENCH_REPEAT:-3}"); do
  rm -rf "$work/cp" "$work/nx"
  cp_runs+="$(measure x cp -r "$model" "$work/cp" | cut -d'|' -f2)"$'\n'
  rm -rf "$work/cp"
  nx_runs+="$(measure x "$root/target/release/nx-shard" --input "$model" --output "$work/nx" --quiet "${flags[@]}" | cut -d'|' -f2)"$'\n'
done
rows=()
rows+=("$(median "cp -r (I/O floor)" "$cp_runs")")
rows+=("$(median "nx-shard" "$nx_runs")")
rows+=("$(measure "python: from_pretrained + torch.save" "$py" "$root/scripts/seed_python_path.py" "$model" "$work/full_state.pt")")
rows+=("$(measure "python: NxD converter model" "$py" "$root/tests/reference/nxd_reference.py" --input_dir "$work/full_state.pt" --output_dir "$work/ref" --config "$model/config.json" --tp_size 32 --pp_size 8 --kv_size_multiplier 4 --qkv_linear --fuse_qkv --save_xser)")
files=$(ls "$work/nx/model"/*.pt | wc -l)
# The two paths must agree: compare every file's tensors.
"$py" - "$work/nx/model" "$work/ref/model" <<'PY' >&2
import sys, torch, pathlib
a, b = map(pathlib.Path, sys.argv[1:])
for f in sorted(a.glob("*.pt")):
    x, y = torch.load(f, weights_only=True, mmap=True), torch.load(b / f.name, weights_only=True, mmap=True)
    assert list(x) == list(y) and all(torch.equal(x[k], y[k]) and x[k].stride() == y[k].stride() for k in x), f
print(f"bench-nx-shard: {len(list(a.glob('*.pt')))} files identical in tensors to the Python converter model")
PY
"$py" - "$bytes" "$files" "$gb" "${rows[@]}" <<'PY'
import json, sys
nbytes, files, gb = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = [(r.split("|")[0], json.loads(r.split("|")[1])) for r in sys.argv[4:]]
t = {k: v for k, v in rows}
cp, nx = t["cp -r (I/O floor)"]["seconds"], t["nx-shard"]["seconds"]
py = t["python: from_pretrained + torch.save"]["seconds"] + t["python: NxD converter model"]["seconds"]
print(f"### {nbytes / 1e9:.2f} GB checkpoint (BENCH_GB={gb}), seed layout: {files} files\n")
print("| contender | seconds (incl. final sync) | peak RssAnon MiB | vs cp -r | all runs, s |")
print("|---|---:|---:|---:|---|")
for name, r in rows:
    runs = ", ".join(f"{s:.2f}" for s in r.get("runs", [r["seconds"]]))
    print(f"| {name} | {r['seconds']:.2f} | {r['peak_rss_anon_mib']:.0f} | {r['seconds'] / cp:.2f}x | {runs} |")
print(f"| python seed path total | {py:.2f} | {max(t['python: from_pretrained + torch.save']['peak_rss_anon_mib'], t['python: NxD converter model']['peak_rss_anon_mib']):.0f} | {py / cp:.2f}x | |")
print(f"\nnx-shard: {nx / cp:.2f}x the time of `cp -r`, {py / nx:.1f}x faster than the Python seed path.\n")
PY
rm -rf "$work"
