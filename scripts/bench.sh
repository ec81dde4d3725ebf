#!/usr/bin/env bash
# Runs every benchmark and rewrites BENCHMARKS.md with the measured figures (never run as a test).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="$root/BENCHMARKS.md"
tmp="$(mktemp)"
{
  echo "# Benchmarks"
  echo
  echo "Measured by \`make bench\` on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(date -u +%Y-%m-%d)."
  echo "Every figure comes from the command shown; rerun it to reproduce."
  echo
  echo "## Strided-copy engine (lib/tensor-formats) next to memcpy"
  echo
  echo "Command: \`cargo run --release -p tensor-formats --example copy_bench\`. In-memory source and sink, so this"
  echo "measures the engine alone; the memcpy row is the physical limit for the same bytes."
  echo
  "$root/target/release/examples/copy_bench"
  echo
  echo "## nx-shard: seed layout next to cp -r and the Python seed path"
  echo
  echo "Command: \`BENCH_GB=<size> bash scripts/bench-nx-shard.sh\`. Wall time includes a final \`sync\`; the page cache"
  echo "is warm for every contender. cp -r and nx-shard are bound by the disk's writeback, which varies between runs, so"
  echo "they run three times, interleaved, and the median run is shown (every run's time in the last column). Peak"
  echo "RssAnon counts heap memory only (mapped checkpoint pages are not counted). The Python path is \`from_pretrained\` + \`torch.save\` (the seed's save step, in bf16), then a"
  echo "faithful Python model of NxD's converter (tests/reference/nxd_reference.py), since NxD itself cannot be"
  echo "installed here; both paths produce the same tensors (checked by the script)."
  echo
  BENCH_GB=1.5 bash "$root/scripts/bench-nx-shard.sh"
  BENCH_GB=3 bash "$root/scripts/bench-nx-shard.sh"
  echo
  echo "## ckpt-unshard"
  echo
  echo "Command: \`bash scripts/bench-ckpt-unshard.sh\`."
  echo
  bash "$root/scripts/bench-ckpt-unshard.sh"
  echo
  echo "## shard-verify"
  echo
  echo "Command: \`bash scripts/bench-shard-verify.sh\`. Files in the page cache: CPU and parsing, not the disk."
  echo
  bash "$root/scripts/bench-shard-verify.sh"
  echo
  echo "## tok-pack"
  echo
  echo "Command: \`bash scripts/bench-tok-pack.sh 50 8192\` (50 MB of real English text, the real Llama 3 tokenizer)."
  echo
  bash "$root/scripts/bench-tok-pack.sh" 50 8192
  echo
  echo "## st-merge"
  echo
  echo "Command: \`bash scripts/bench-st-merge.sh\` (gqa_large, BENCH_GB=1.5 by default). Wall time includes a final"
  echo "\`sync\`; peak RssAnon is heap only. The adapter is a PEFT LoRA (r 16, every linear layer) made by the script."
  echo
  bash "$root/scripts/bench-st-merge.sh"
  echo
  echo "## hf-fetch"
  echo
  echo "Command: \`BENCH_REPEAT=3 bash scripts/bench-hf-fetch.sh\`. The stand-in Hub (scripts/stand_in_hub.py) on loopback;"
  echo "huggingface_hub 2.4 (.venv/current) and 0.36 with and without hf_transfer (.venv/hub036). Times include a final"
  echo "\`sync\`; Python clients are timed inside the call; the clients take turns, round after round. hf-fetch also verifies"
  echo "every byte (sha256 / git sha1) and fsyncs each file before its rename; the Python clients do neither."
  echo
  BENCH_REPEAT=3 bash "$root/scripts/bench-hf-fetch.sh"
} > "$tmp"
mv "$tmp" "$out"
echo "bench: wrote $out" >&2
