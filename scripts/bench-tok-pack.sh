#!/usr/bin/env bash
# Benchmark tok-pack against the Python pipeline (NxD's get_dataset.py: datasets map tokenize -> map group_texts ->
# save_to_disk) and against the raw tokenizer throughput, on a corpus of real English text with the Llama 3
# tokenizer. Prints a Markdown table.
#
#   scripts/bench-tok-pack.sh [MB=50] [BLOCK=8192]
#
# Environment: PY (default .venv/current/bin/python), BIN (default target/release), FIXTURES (default fixtures),
# OUT (default bench-out/tok-pack), JOBS (tok-pack --jobs, default all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-50}
BLOCK=${2:-8192}
PY=${PY:-.venv/current/bin/python}
BIN=${BIN:-target/release}
FIXTURES=${FIXTURES:-fixtures}
OUT=${OUT:-bench-out/tok-pack}
TOK="$FIXTURES/tokenizer"
mkdir -p "$OUT"
CORPUS="$OUT/corpus-${MB}mb.jsonl"
[ -s "$CORPUS" ] || "$PY" scripts/make-corpus.py "$CORPUS" --mb "$MB" --meta >&2
[ -x "$BIN/tok-pack" ] || { echo "bench-tok-pack: $BIN/tok-pack missing: cargo build --release -p tok-pack" >&2; exit 2; }

export HF_HOME="$OUT/hf" HF_DATASETS_CACHE="$OUT/hf/datasets" HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
rm -rf "$OUT/hf" "$OUT/ours-compat" "$OUT/ours-refenc" "$OUT/ours-default" "$OUT/ref"

timed() { # timed NAME CMD... : wall seconds and max RSS (MB) into $OUT/NAME.time
  /usr/bin/time -f "%e %M" -o "$OUT/$1.time" "${@:2}"
}

JOBS_ARG=()
[ -n "${JOBS:-}" ] && JOBS_ARG=(--jobs "$JOBS")
timed ours-compat "$BIN/tok-pack" --tokenizer "$TOK" --input "$CORPUS" --output "$OUT/ours-compat" \
  --block-size "$BLOCK" --compat nxd -q "${JOBS_ARG[@]}"
timed ours-refenc "$BIN/tok-pack" --tokenizer "$TOK" --input "$CORPUS" --output "$OUT/ours-refenc" \
  --block-size "$BLOCK" --compat nxd --encoder reference -q "${JOBS_ARG[@]}"
timed ours-default "$BIN/tok-pack" --tokenizer "$TOK" --input "$CORPUS" --output "$OUT/ours-default" \
  --block-size "$BLOCK" -q "${JOBS_ARG[@]}"

timed ref "$PY" - "$CORPUS" "$TOK" "$OUT/ref" "$BLOCK" <<'EOF'
import sys
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer
corpus, tokenizer_path, save_path, block_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
raw_datasets = load_dataset("json", data_files={"train": corpus})
tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
column_names = raw_datasets["train"].column_names
text_column_name = "text" if "text" in column_names else column_names[0]
def tokenize_function(examples):
    return tokenizer(examples[text_column_name])
tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=column_names)
block_size = min(block_size, tokenizer.model_max_length)
def group_texts(examples):
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated_examples.items()}
    result["labels"] = result["input_ids"].copy()
    return result
lm_datasets = tokenized_datasets.map(group_texts, batched=True)
lm_datasets["train"].save_to_disk(save_path)
EOF

# Raw tokenizer throughput (Python tokenizers, Rust inside, all cores): encode_batch_fast over 1000-doc batches.
"$PY" - "$CORPUS" "$TOK/tokenizer.json" > "$OUT/raw.txt" <<'EOF'
import json, sys, time
from tokenizers import Tokenizer
texts = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
tok = Tokenizer.from_file(sys.argv[2])
t = time.perf_counter(); n = 0
for i in range(0, len(texts), 1000):
    n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + 1000], add_special_tokens=True))
print(time.perf_counter() - t, n, len(texts))
EOF

# Equal to the reference?
SAME=$("$PY" - "$OUT/ref" "$OUT/ours-compat" "$OUT/ours-refenc" <<'EOF'
import sys, datasets
b = datasets.load_from_disk(sys.argv[1])
def same(p):
    a = datasets.load_from_disk(p)
    return a.features == b.features and a.data.table.combine_chunks().equals(b.data.table.combine_chunks())
print("yes (both encoders)" if all(same(p) for p in sys.argv[2:]) else "NO")
EOF
)

read -r RAW_S TOKENS DOCS < "$OUT/raw.txt"
read -r C_S C_KB < "$OUT/ours-compat.time"
read -r D_S D_KB < "$OUT/ours-default.time"
read -r E_S E_KB < "$OUT/ours-refenc.time"
read -r R_S R_KB < "$OUT/ref.time"
BYTES=$(stat -c %s "$CORPUS")
"$PY" - "$BYTES" "$TOKENS" "$DOCS" "$RAW_S" "$C_S" "$C_KB" "$D_S" "$D_KB" "$R_S" "$R_KB" "$SAME" "$BLOCK" "$(nproc)" "$E_S" "$E_KB" <<'EOF'
import sys
b, tok, docs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
raw, cs, ckb, ds, dkb, rs, rkb = map(float, sys.argv[4:11])
same, block, cores = sys.argv[11], sys.argv[12], sys.argv[13]
es, ekb = float(sys.argv[14]), float(sys.argv[15])
print(f"Corpus: {b / 1e6:.1f} MB JSON lines, {docs} documents, {tok:,} tokens (Llama 3), block {block}, {cores} cores.\n")
print("| pipeline | wall s | M tokens/s | MB/s | max RSS MB | vs Python |")
print("|---|---:|---:|---:|---:|---:|")
def row(name, s, kb):
    rss = f"{kb / 1024:.0f}" if kb else "-"
    print(f"| {name} | {s:.2f} | {tok / s / 1e6:.2f} | {b / s / 1e6:.1f} | {rss} | {rs / s:.1f}x |")
row("Python get_dataset.py (datasets map + group_texts + save_to_disk)", rs, rkb)
row("tok-pack --compat nxd (fast encoder: tokenizers 1.0.0-rc.3)", cs, ckb)
row("tok-pack --compat nxd --encoder reference (tokenizers 0.22)", es, ekb)
row("tok-pack default mode (concatenated, EOS; fast encoder)", ds, dkb)
row("raw tokenizer: py tokenizers encode_batch_fast (tokenize only)", raw, 0)
print(f"\ntok-pack --compat nxd output equal to the Python pipeline's (load_from_disk): {same}")
EOF
