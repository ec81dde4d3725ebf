#!/usr/bin/env bash
# st-merge benchmark (make bench): on the gqa_large fixture (BENCH_GB, default 1.5 GB, bf16, 4 shards),
#  1. one .pt (the seed's save-llama3-70B-model.py step) next to `cp -r` (the I/O floor) and the seed's own
#     from_pretrained + torch.save;
#  2. a reshard to 500 MB shards and an fp32 copy;
#  3. a LoRA merge (a PEFT adapter, r 16 on every linear layer, made here with peft, init_lora_weights=False)
#     next to PEFT's PeftModel.from_pretrained + merge_and_unload + save_pretrained on the same adapter.
# Wall time includes a final sync; peak RssAnon is heap memory only (mapped files excluded). Prints Markdown.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/current/bin/python"
bin="$root/target/release"
gb="${BENCH_GB:-1.5}"
model="$root/fixtures/models/gqa_large"
"$py" "$root/scripts/gen_fixtures.py" "$root/fixtures/models" --only gqa_large --large-gb "$gb" >&2
work="$(mktemp -d "${BENCH_DIR:-$root/bench-out}.XXXX" 2>/dev/null || mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$py" - "$model" "$work/adapter" <<'PY' >&2
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)).save_pretrained(sys.argv[2])
print("bench-st-merge: adapter written")
PY

measure() { # label, command...
  local label="$1"; shift
  sync
  echo "$label|$("$py" "$root/scripts/peak_mem.py" --json -- bash -c '"$@" >&2 && sync' _ "$@")"
}
rows=()
rows+=("$(measure "cp -r of the checkpoint (I/O floor)" cp -r "$model" "$work/cp")")
rows+=("$(measure "st-merge DIR -o x.pt" "$bin/st-merge" -q "$model" -o "$work/model.pt")")
rows+=("$(measure "python: from_pretrained + torch.save (the seed)" "$py" -c "import sys, torch; from transformers import AutoModelForCausalLM; torch.save(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).state_dict(), sys.argv[2])" "$model" "$work/seed.pt")")
rows+=("$(measure "st-merge reshard --max-shard-size 500MB" "$bin/st-merge" -q "$model" -o "$work/resharded" --max-shard-size 500MB)")
rows+=("$(measure "st-merge --dtype fp32 (2x the bytes out)" "$bin/st-merge" -q "$model" -o "$work/fp32" --dtype fp32)")
rm -rf "$work/fp32" "$work/cp" "$work/resharded"
rows+=("$(measure "st-merge --lora (r 16, 112 linear layers)" "$bin/st-merge" -q "$model" --lora "$work/adapter" -o "$work/merged")")
rows+=("$(measure "python: PEFT merge_and_unload + save_pretrained" "$py" -c "import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel; m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16); PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])" "$model" "$work/adapter" "$work/peft")")

# Sanity: the .pt equals the seed's, tensor for tensor; the merged weights are compared with PEFT's (its
# adapters load in fp32 by default, so its CPU merge also rounds once: expect no difference).
"$py" - "$work" <<'PY' >&2
import sys, pathlib, torch
from safetensors.torch import load_file
w = pathlib.Path(sys.argv[1])
a, b = torch.load(w / "model.pt", weights_only=True, mmap=True), torch.load(w / "seed.pt", weights_only=True, mmap=True)
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
def load(d):
    out = {}
    for f in sorted(pathlib.Path(d).glob("*.safetensors")): out.update(load_file(f))
    return out
ours, peft = load(w / "merged"), load(w / "peft")
assert ours.keys() == peft.keys()
worst = max((ours[k].float() - peft[k].float()).abs().max().item() for k in ours)
differ = sum((ours[k] != peft[k]).sum().item() for k in ours)
total = sum(t.numel() for t in ours.values())
print(f"bench-st-merge: .pt identical to the seed's; merged weights vs PEFT's: {differ}/{total} elements differ, max |diff| {worst:.3g}")
PY
bytes=$(du -sb "$model" | cut -f1)
"$py" - "$bytes" "${rows[@]}" <<'PY'
import json, sys
nbytes = int(sys.argv[1])
rows = [(r.split("|")[0], json.loads(r.split("|")[1])) for r in sys.argv[2:]]
cp = rows[0][1]["seconds"]
print(f"### st-merge on a {nbytes / 1e9:.2f} GB bf16 checkpoint (4 shards)\n")
print("| contender | seconds (incl. final sync) | peak RssAnon MiB | vs cp -r |")
print("|---|---:|---:|---:|")
for name, r in rows:
    print(f"| {name} | {r['seconds']:.2f} | {r['peak_rss_anon_mib']:.0f} | {r['seconds'] / cp:.2f}x |")
print()
PY
