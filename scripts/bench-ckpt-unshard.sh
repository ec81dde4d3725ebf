#!/usr/bin/env bash
# ckpt-unshard benchmark (make bench): the seed layout's 256 shard files (tp 32, pp 8, kv multiplier 4,
# qkv_linear, fuse_qkv) of the ~1.7 GB gqa_large fixture back to an HF checkpoint, next to `cp -r` of the shard
# set (the I/O floor) and the reverse of the Python model of NxD's converter (NxD's own reverse cannot be
# installed here, and for fused qkv it splits in three equal parts, which is wrong for GQA: the model is run
# unfused). Wall time includes a final sync; peak RssAnon is heap memory only. Prints Markdown.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/current/bin/python"
bin="$root/target/release"
model="$root/fixtures/models/gqa_large"
"$py" "$root/scripts/gen_fixtures.py" "$root/fixtures/models" --only gqa_large --large-gb 1.5 >&2
work="$(mktemp -d "${BENCH_DIR:-$root/bench-out}.XXXX" 2>/dev/null || mktemp -d)"
trap 'rm -rf "$work"' EXIT
fused=(--tp 32 --pp 8 --kv-size-multiplier 4 --qkv-linear --fuse-qkv)
unfused=(--tp 32 --pp 8 --kv-size-multiplier 4 --qkv-linear)
"$bin/nx-shard" --input "$model" --output "$work/fused" --quiet "${fused[@]}" >&2
"$bin/nx-shard" --input "$model" --output "$work/unfused" --quiet "${unfused[@]}" >&2
measure() { # label, command...
  local label="$1"; shift
  sync
  echo "$label|$("$py" "$root/scripts/peak_mem.py" --json -- bash -c '"$@" >&2 && sync' _ "$@")"
}
rows=()
rows+=("$(measure "cp -r of the shard set (I/O floor)" cp -r "$work/fused/model" "$work/cp")")
rows+=("$(measure "ckpt-unshard" "$bin/ckpt-unshard" --input "$work/fused" --output "$work/hf" --config "$model/config.json" "${fused[@]}")")
rows+=("$(measure "ckpt-unshard --check-replicas" "$bin/ckpt-unshard" --input "$work/fused" --output "$work/hf2" --config "$model/config.json" --check-replicas "${fused[@]}")")
rows+=("$(measure "python: NxD converter model, reverse (unfused)" "$py" "$root/tests/reference/nxd_reference.py" --reverse --input_dir "$work/unfused/model" --output_dir "$work/ref" --config "$model/config.json" --tp_size 32 --pp_size 8 --kv_size_multiplier 4 --qkv_linear)")
# The round trip must be exact: the HF output equals the original checkpoint, tensor for tensor.
"$py" - "$model" "$work/hf" <<'PY' >&2
import sys, json, pathlib
from safetensors.torch import load_file
import torch
def load(d):
    d = pathlib.Path(d); out = {}
    for f in sorted(d.glob("*.safetensors")): out.update(load_file(f))
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print(f"bench-ckpt-unshard: {len(a)} tensors identical to the original checkpoint")
PY
bytes=$(du -sb "$work/fused/model" | cut -f1)
"$py" - "$bytes" "${rows[@]}" <<'PY'
import json, sys
nbytes = int(sys.argv[1])
rows = [(r.split("|")[0], json.loads(r.split("|")[1])) for r in sys.argv[2:]]
cp = rows[0][1]["seconds"]
print(f"### {nbytes / 1e9:.2f} GB shard set (256 files) back to an HF checkpoint\n")
print("| contender | seconds (incl. final sync) | peak RssAnon MiB | vs cp -r |")
print("|---|---:|---:|---:|")
for name, r in rows:
    print(f"| {name} | {r['seconds']:.2f} | {r['peak_rss_anon_mib']:.0f} | {r['seconds'] / cp:.2f}x |")
print()
PY
