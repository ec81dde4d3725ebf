#!/usr/bin/env bash
# The whole pipeline on an embedded default, offline, in a few minutes: what `make demo` runs.
#
# Usage: scripts/demo.sh [WORK]      (default WORK: ./demo-out; needs `make venv fixtures build` first)
#
# A tiny Llama-3-architecture checkpoint (written by transformers, random weights: fixtures/models/gqa_llama3) and
# the real Llama 3 tokenizer are served by the project's stand-in Hub on 127.0.0.1, then:
#   1. hf-fetch downloads the repo (parallel, checksum-verified) and shard-verify checks it against the manifest;
#   2. nx-shard writes NxD shards: tp 4 x pp 4 (6 layers: uneven stages), 2 kv heads replicated twice
#      (--qkv-linear --kv-size-multiplier 2), fused qkv, xser; shard-verify proves the set complete and correct;
#   3. tok-pack tokenizes a small real-text corpus into 1024-token rows, exactly as NxD's get_dataset.py would,
#      and shard-verify checks every row;
#   4. ckpt-unshard turns the shards back into a Hugging Face checkpoint, compared bit for bit with the original;
# and the NxD training job's sbatch script is written for those shards and that dataset.
# Each step prints the command it runs. Rerunning resumes: finished outputs are kept.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${1:-$ROOT/demo-out}" && cd "${1:-$ROOT/demo-out}" && pwd)
BIN=${BIN:-$ROOT/target/release}
PY=${PY:-$ROOT/.venv/current/bin/python}
FIXTURES=${FIXTURES:-$ROOT/fixtures}
REPO=demo/tiny-llama3
MODEL=$WORK/hf/tiny-llama3
SHARDS=$WORK/nxd/tiny-llama3-tp4-pp4
DATA=$WORK/data/corpus-1024
LAYOUT=(--tp 4 --pp 4 --kv-size-multiplier 2 --qkv-linear --fuse-qkv --xser)

for f in "$BIN/hf-fetch" "$BIN/nx-shard" "$FIXTURES/models/gqa_llama3/config.json" "$FIXTURES/tokenizer/tokenizer.json" "$PY"; do
  [ -e "$f" ] || { echo "demo: $f is missing: run 'make venv fixtures build' (or just 'make demo')" >&2; exit 2; }
done

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*" | sed "s#$WORK#\$WORK#g; s#$BIN/##g; s#$ROOT/##g"; "$@"; }

# The repo the stand-in Hub serves: the checkpoint plus the tokenizer files, as on the real Hub.
HUB_REPO=$WORK/hub/$REPO
if [ ! -f "$HUB_REPO/.complete" ]; then
  rm -rf "$HUB_REPO" && mkdir -p "$HUB_REPO"
  cp "$FIXTURES"/models/gqa_llama3/{config.json,generation_config.json,model.safetensors.index.json,model-*.safetensors} "$HUB_REPO/"
  cp "$FIXTURES"/tokenizer/{tokenizer.json,tokenizer_config.json} "$HUB_REPO/"
  touch "$HUB_REPO/.complete"
fi

say "0. a stand-in Hugging Face Hub on 127.0.0.1 serves $REPO (the real Hub needs internet and a token)"
PORT_FILE=$WORK/hub/port
rm -f "$PORT_FILE"
"$PY" "$ROOT/scripts/stand_in_hub.py" --repo "$REPO=$HUB_REPO" --port 0 --port-file "$PORT_FILE" \
  >"$WORK/hub/server.log" 2>&1 &
HUB_PID=$!
trap 'kill $HUB_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$PORT_FILE" ] && break; sleep 0.1; done
[ -s "$PORT_FILE" ] || { echo "demo: the stand-in Hub did not start; see $WORK/hub/server.log" >&2; exit 3; }
export HF_ENDPOINT="http://127.0.0.1:$(cat "$PORT_FILE")"
echo "HF_ENDPOINT=$HF_ENDPOINT"

say "1. download the model, then prove the download complete against its manifest"
run "$BIN/hf-fetch" "$REPO" --local-dir "$MODEL" --manifest "$WORK/hf/tiny-llama3.manifest.jsonl" --quiet
run "$BIN/shard-verify" "$MODEL" --manifest "$WORK/hf/tiny-llama3.manifest.jsonl" -q

say "2. shard for NxD: tp 4 x pp 4, GQA kv replication, fused qkv, xser; then verify the set"
run "$BIN/nx-shard" --input "$MODEL" --output "$SHARDS" "${LAYOUT[@]}" -q
run "$BIN/shard-verify" "$SHARDS" "${LAYOUT[@]}" --config "$MODEL/config.json" \
  --manifest "$SHARDS/nx-shard.manifest.jsonl" -q

say "3. tokenize a small real-text corpus into 1024-token rows (NxD get_dataset.py format); verify every row"
[ -s "$WORK/corpus.jsonl" ] || run "$PY" "$ROOT/scripts/make-corpus.py" "$WORK/corpus.jsonl" --mb 3
if [ ! -f "$DATA/state.json" ]; then
  run "$BIN/tok-pack" --tokenizer "$MODEL" --input "$WORK/corpus.jsonl" --output "$DATA" --block-size 1024 \
    --compat nxd --manifest "$DATA.manifest.jsonl" -q
fi
run "$BIN/shard-verify" "$DATA" --block-size 1024 --vocab-size 128256 --manifest "$DATA.manifest.jsonl" -q

say "4. back to a Hugging Face checkpoint, compared bit for bit with the download"
if [ ! -f "$WORK/roundtrip/config.json" ]; then
  run "$BIN/ckpt-unshard" --input "$SHARDS" --output "$WORK/roundtrip" --config "$MODEL/config.json" "${LAYOUT[@]}" -q
fi
run "$PY" "$ROOT/scripts/compare_checkpoints.py" "$MODEL" "$WORK/roundtrip"

say "5. the NxD training job for these shards and this dataset (sbatch script; submit it on a Trainium cluster)"
run bash "$ROOT/scripts/write-pretrain-sbatch.sh" --model-dir "$MODEL" --shards "$SHARDS" --data "$DATA" \
  --out "$WORK/pretrain.sbatch" --tp 4 --pp 4 --kv-multiplier 2 --seq-len 1024 --nodes 1 --force
if command -v sbatch >/dev/null && timeout 10 sinfo >/dev/null 2>&1; then
  # Slurm is up here (make slurm): let it check the script against this cluster without running it.
  run timeout 30 sbatch --test-only "$WORK/pretrain.sbatch"
fi

cat <<EOF

Done. Everything is under $WORK:
  hf/tiny-llama3/          the downloaded Hugging Face checkpoint (+ hf/tiny-llama3.manifest.jsonl)
  nxd/tiny-llama3-tp4-pp4/ model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt: 16 NxD shard files (+ nx-shard.manifest.jsonl)
  data/corpus-1024/        the tokenized dataset, loadable by datasets.load_from_disk (+ corpus-1024.manifest.jsonl)
  roundtrip/               the shards turned back into a Hugging Face checkpoint, identical to the download
  pretrain.sbatch          the Slurm script launching NxD's run_llama_nxd.py on them
The real thing is the same commands at scale: see "The real 70B recipe" in README.md (make pretrain-70b).
EOF
