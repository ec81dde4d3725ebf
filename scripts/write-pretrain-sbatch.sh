#!/usr/bin/env bash
# Write the sbatch script that continues pre-training a Llama model with NxD's run_llama_nxd.py
# (examples/training/llama/tp_pp_llama_hf_pretrain) from pre-sharded weights (`--pretrained_weight 1`) and a
# tokenized dataset, modelled on the seed tutorial's run_llama3_70B_tp_pp.sh + `sbatch --nodes N --exclusive
# --wrap "srun [neuron_parallel_compile] bash run_llama3_70B_tp_pp.sh"`, in one self-contained file.
#
# Usage: scripts/write-pretrain-sbatch.sh --model-dir DIR --shards DIR --data DIR --out FILE [options]
#
# Required:
#   --model-dir DIR        the Hugging Face model directory (its config.json is NxD's --training_config)
#   --shards DIR           nx-shard's --output: DIR/model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt (TP x PP files)
#   --data DIR             tok-pack's --output (a datasets save_to_disk directory), NxD's --training_dir
#   --out FILE             where to write the sbatch script ("-" for stdout)
# Layout (defaults: the Llama 3 70B seed layout):
#   --tp N                 tensor-parallel degree (--tensor_parallel_size)            [32]
#   --pp N                 pipeline-parallel degree (--pipeline_parallel_size)       [8]
#   --kv-multiplier N      kv heads replication (--kv_replicator; alias --kv-size-multiplier) [4]
#   --qkv-linear 0|1       GQAQKVColumnParallelLinear (--qkv_linear)                 [1]
#   --fuse-qkv 0|1         fused qkv weight (--fuse_qkv; shard with nx-shard --fuse-qkv) [1]
#   --xser 0|1             shards and checkpoints in xser form (--save_load_xser; nx-shard --xser) [1]
#   --seq-len N            sequence length (--seq_len; tok-pack --block-size)        [8192]
# Cluster:
#   --nodes N              trn1.32xlarge nodes (#SBATCH --nodes)                      [16]
#   --cores-per-node N     NeuronCores per node (torchrun --nproc_per_node)           [32]
#   --partition NAME       #SBATCH --partition                                        [none: the default one]
#   --cpus-per-task N      #SBATCH --cpus-per-task (the seed's 128)                   [none]
#   --time T               #SBATCH --time                                             [none]
#   --job-name NAME        #SBATCH --job-name                                         [pretrain-llama]
#   --auto-resume 0|1      #SBATCH --auto-resume=1 (SageMaker HyperPod's Slurm only)  [0]
#   --precompile 0|1       first `srun neuron_parallel_compile` (10 steps, graphs only), then train;
#                          skipped when Slurm restarts a requeued job                 [1]
# Training:
#   --gbs N                global batch size (per-replica batch = GBS / data-parallel degree) [1024]
#   --max-steps N          [30000]        --checkpoint-freq N   [30000]   --num-kept-checkpoint N  [-1]
#   --lr X                 [0.000015]     --warmup-steps N      [2000]
#   --ckpt-dir DIR         NxD's --checkpoint_dir: training checkpoints go there, and a requeued job resumes
#                          from the newest one (--loading_step latest_if_exists). DIR/pretrained_weight must
#                          be the shards: made as a symlink to --shards when the job starts [the parent of
#                          --shards when --shards is named pretrained_weight, as in the seed; else
#                          <dir of --out>/checkpoints]
#   --training-config DIR  a directory with config.json                               [--model-dir]
#   --nxd-dir DIR          where run_llama_nxd.py and its modules are (the job cds there)
#                                                                     [$HOME/examples/tp_pp_llama_hf_pretrain]
#   --venv DIR             a Python venv with torch-neuronx + neuronx_distributed, activated by the job [none]
#   --log-dir DIR          Slurm output and per-node logs                             [<dir of --out>/logs]
#   --tb-dir DIR           tensorboard dir                                            [<log dir>/tensorboard]
#   --master-port N        torchrun rendezvous port (reserved with sysctl when sudo works) [44000]
#   --force                overwrite --out
#
# The script checks the inputs when the job starts (config.json, TP x PP shard files, the dataset's state.json,
# run_llama_nxd.py) and fails at once with the reason, instead of after the compilation. Submit it with
# `sbatch FILE`; `sbatch --test-only FILE` checks it against the cluster without running it.
# Exit status: 0 written, 2 usage error (bad flag, missing or inconsistent value).
set -euo pipefail

die() { echo "write-pretrain-sbatch: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

MODEL_DIR= SHARDS= DATA= OUT=
TP=32 PP=8 KV=4 QKV_LINEAR=1 FUSE_QKV=1 XSER=1 SEQ_LEN=8192
NODES=16 CORES=32 PARTITION= CPUS_PER_TASK= TIME= JOB_NAME=pretrain-llama AUTO_RESUME=0 PRECOMPILE=1
GBS=1024 MAX_STEPS=30000 CKPT_FREQ=30000 NUM_KEPT=-1 LR=0.000015 WARMUP=2000
CKPT_DIR= TRAINING_CONFIG= NXD_DIR='$HOME/examples/tp_pp_llama_hf_pretrain' VENV= LOG_DIR= TB_DIR=
MASTER_PORT=44000 FORCE=0

need() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --model-dir) need "$@"; MODEL_DIR=$2; shift 2 ;;
        --shards) need "$@"; SHARDS=$2; shift 2 ;;
        --data) need "$@"; DATA=$2; shift 2 ;;
        --out) need "$@"; OUT=$2; shift 2 ;;
        --tp|--tp-size|--tp_size) need "$@"; TP=$2; shift 2 ;;
        --pp|--pp-size|--pp_size) need "$@"; PP=$2; shift 2 ;;
        --kv-multiplier|--kv-size-multiplier|--kv_size_multiplier|--kv-mult|--kv-replicator) need "$@"; KV=$2; shift 2 ;;
        --qkv-linear|--qkv_linear) need "$@"; QKV_LINEAR=$2; shift 2 ;;
        --fuse-qkv|--fuse_qkv) need "$@"; FUSE_QKV=$2; shift 2 ;;
        --xser|--save-load-xser) need "$@"; XSER=$2; shift 2 ;;
        --seq-len|--seq_len|--block-size) need "$@"; SEQ_LEN=$2; shift 2 ;;
        --nodes) need "$@"; NODES=$2; shift 2 ;;
        --cores-per-node) need "$@"; CORES=$2; shift 2 ;;
        --partition) need "$@"; PARTITION=$2; shift 2 ;;
        --cpus-per-task) need "$@"; CPUS_PER_TASK=$2; shift 2 ;;
        --time) need "$@"; TIME=$2; shift 2 ;;
        --job-name) need "$@"; JOB_NAME=$2; shift 2 ;;
        --auto-resume) need "$@"; AUTO_RESUME=$2; shift 2 ;;
        --precompile) need "$@"; PRECOMPILE=$2; shift 2 ;;
        --gbs) need "$@"; GBS=$2; shift 2 ;;
        --max-steps) need "$@"; MAX_STEPS=$2; shift 2 ;;
        --checkpoint-freq) need "$@"; CKPT_FREQ=$2; shift 2 ;;
        --num-kept-checkpoint) need "$@"; NUM_KEPT=$2; shift 2 ;;
        --lr) need "$@"; LR=$2; shift 2 ;;
        --warmup-steps) need "$@"; WARMUP=$2; shift 2 ;;
        --ckpt-dir) need "$@"; CKPT_DIR=$2; shift 2 ;;
        --training-config) need "$@"; TRAINING_CONFIG=$2; shift 2 ;;
        --nxd-dir) need "$@"; NXD_DIR=$2; shift 2 ;;
        --venv) need "$@"; VENV=$2; shift 2 ;;
        --log-dir) need "$@"; LOG_DIR=$2; shift 2 ;;
        --tb-dir) need "$@"; TB_DIR=$2; shift 2 ;;
        --master-port) need "$@"; MASTER_PORT=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ -n "$MODEL_DIR" ] || die "--model-dir is required (the Hugging Face model directory)"
[ -n "$SHARDS" ] || die "--shards is required (nx-shard's --output directory)"
[ -n "$DATA" ] || die "--data is required (tok-pack's --output directory)"
[ -n "$OUT" ] || die "--out is required (the sbatch script to write, or -)"
for v in TP PP KV SEQ_LEN NODES CORES GBS MAX_STEPS MASTER_PORT WARMUP; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "${v,,} must be a positive whole number, not '${!v}'"
done
for v in QKV_LINEAR FUSE_QKV XSER AUTO_RESUME PRECOMPILE; do
    case "${!v}" in 1|true|True|yes) printf -v "$v" 1 ;; 0|false|False|no) printf -v "$v" 0 ;;
        *) die "${v,,} must be 0 or 1, not '${!v}'" ;; esac
done
[[ $CKPT_FREQ =~ ^-?[0-9]+$ ]] || die "--checkpoint-freq must be a whole number (-1: never)"
[[ $NUM_KEPT =~ ^-?[0-9]+$ ]] || die "--num-kept-checkpoint must be a whole number (-1: keep all)"
[ -z "$CPUS_PER_TASK" ] || [[ $CPUS_PER_TASK =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive whole number"
[ "$FUSE_QKV" = 0 ] || [ "$QKV_LINEAR" = 1 ] || die "--fuse-qkv 1 needs --qkv-linear 1"
[ "$KV" = 1 ] || [ "$QKV_LINEAR" = 1 ] || die "--kv-multiplier $KV needs --qkv-linear 1 (NxD replicates kv heads only in GQAQKVColumnParallelLinear)"
TOTAL=$((CORES * NODES))
[ $((TOTAL % (TP * PP))) = 0 ] \
    || die "$NODES nodes x $CORES cores = $TOTAL NeuronCores is not a multiple of tp x pp = $((TP * PP)); use --nodes a multiple of $(( (TP * PP + CORES - 1) / CORES ))"
DP=$((TOTAL / (TP * PP)))
[ $((GBS % DP)) = 0 ] || die "--gbs $GBS is not a multiple of the data-parallel degree $DP ($TOTAL cores / tp $TP / pp $PP)"

abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
MODEL_DIR=$(abspath "${MODEL_DIR%/}"); SHARDS=$(abspath "${SHARDS%/}"); DATA=$(abspath "${DATA%/}")
[ -n "$TRAINING_CONFIG" ] && TRAINING_CONFIG=$(abspath "${TRAINING_CONFIG%/}") || TRAINING_CONFIG=$MODEL_DIR
if [ "$OUT" = - ]; then out_dir=$PWD; else OUT=$(abspath "$OUT"); out_dir=$(dirname "$OUT"); fi
if [ -z "$CKPT_DIR" ]; then
    if [ "$(basename "$SHARDS")" = pretrained_weight ]; then CKPT_DIR=$(dirname "$SHARDS"); else CKPT_DIR=$out_dir/checkpoints; fi
fi
CKPT_DIR=$(abspath "${CKPT_DIR%/}")
[ -n "$LOG_DIR" ] && LOG_DIR=$(abspath "${LOG_DIR%/}") || LOG_DIR=$out_dir/logs
[ -n "$TB_DIR" ] && TB_DIR=$(abspath "${TB_DIR%/}") || TB_DIR=$LOG_DIR/tensorboard
case "$NXD_DIR" in '$HOME'*) ;; *) NXD_DIR=$(abspath "${NXD_DIR%/}") ;; esac
[ -z "$VENV" ] || VENV=$(abspath "${VENV%/}")
if [ "$OUT" != - ] && [ -e "$OUT" ] && [ "$FORCE" = 0 ]; then die "$OUT exists (use --force to overwrite)"; fi

q() { printf '%q' "$1"; }
EXTRA=
[ -z "$PARTITION" ] || EXTRA+=$'\n'"#SBATCH --partition=$PARTITION"
[ -z "$CPUS_PER_TASK" ] || EXTRA+=$'\n'"#SBATCH --cpus-per-task=$CPUS_PER_TASK"
[ -z "$TIME" ] || EXTRA+=$'\n'"#SBATCH --time=$TIME"
[ "$AUTO_RESUME" = 0 ] || EXTRA+=$'\n'"#SBATCH --auto-resume=1"
if [[ $NXD_DIR == '$HOME'* ]]; then NXD_LINE="\"\$HOME\"$(q "${NXD_DIR#\$HOME}")"; else NXD_LINE=$(q "$NXD_DIR"); fi

generate() {
cat <<EOF
#!/bin/bash
# Continual pre-training with NxD's run_llama_nxd.py from pre-sharded weights (--pretrained_weight 1).
# Written by scripts/write-pretrain-sbatch.sh (nxd tools); regenerate it rather than edit it.
# Layout: tp $TP x pp $PP = $((TP * PP)) NeuronCores per model replica, kv multiplier $KV, qkv_linear $QKV_LINEAR,
# fuse_qkv $FUSE_QKV, xser $XSER, seq len $SEQ_LEN; $NODES nodes x $CORES cores -> data-parallel degree $DP.
# Submit: sbatch $(q "${OUT/#-/FILE}")      Check against the cluster without running: sbatch --test-only FILE
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$LOG_DIR/%x-%j.out$EXTRA
set -euo pipefail

# ---- what to train on ------------------------------------------------------------------------------------------
# The Hugging Face model; NxD's --training_config is a directory with config.json.
export MODEL_DIR=$(q "$MODEL_DIR")
export TRAINING_CONFIG=$(q "$TRAINING_CONFIG")
# nx-shard's --output: \$SHARDS/model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt
export SHARDS=$(q "$SHARDS")
# tok-pack's --output: NxD's --training_dir
export DATA=$(q "$DATA")
# NxD's --checkpoint_dir: training checkpoints, and the tag pretrained_weight = \$SHARDS
export CKPT_DIR=$(q "$CKPT_DIR")
# run_llama_nxd.py and its modules; the venv with torch-neuronx and neuronx_distributed (empty: none)
export NXD_DIR=$NXD_LINE
export VENV=$(q "$VENV")
export LOG_DIR=$(q "$LOG_DIR")
export TB_DIR=$(q "$TB_DIR")
# ---- layout and training settings ------------------------------------------------------------------------------
export TP_DEGREE=$TP PP_DEGREE=$PP KV_REPLICATOR=$KV QKV_LINEAR=$QKV_LINEAR FUSE_QKV=$FUSE_QKV SAVE_LOAD_XSER=$XSER
export SEQ_LEN=$SEQ_LEN GBS=$GBS MAX_STEPS=$MAX_STEPS CHECKPOINT_FREQ=$CKPT_FREQ NUM_KEPT_CHECKPOINT=$NUM_KEPT
export LR=$LR WARMUP_STEPS=$WARMUP PROCESSES_PER_NODE=$CORES MASTER_PORT=$MASTER_PORT
PRECOMPILE=\${PRECOMPILE:-$PRECOMPILE}

if [ -z "\${SLURM_JOB_ID:-}" ]; then
    echo "submit this script with sbatch (it runs one srun task per node)" >&2; exit 2
fi
fail() { echo "pretrain: error: \$*" >&2; exit 2; }

# ---- check the inputs now rather than after the graph compilation ------------------------------------------------
[ -f "\$TRAINING_CONFIG/config.json" ] || fail "\$TRAINING_CONFIG/config.json is missing (--model-dir / --training-config)"
n=\$(find "\$SHARDS/model" -maxdepth 1 -name 'dp_rank_*_tp_rank_*_pp_rank_*.pt' 2>/dev/null | wc -l)
[ "\$n" = \$((TP_DEGREE * PP_DEGREE)) ] || fail "\$SHARDS/model holds \$n shard files, not tp x pp = \$((TP_DEGREE * PP_DEGREE)): run nx-shard with --tp \$TP_DEGREE --pp \$PP_DEGREE (and shard-verify)"
[ -f "\$DATA/state.json" ] || fail "\$DATA is not a datasets save_to_disk directory (no state.json): run tok-pack --output \$DATA --block-size \$SEQ_LEN"
[ -f "\$NXD_DIR/run_llama_nxd.py" ] || fail "\$NXD_DIR/run_llama_nxd.py is missing: copy neuronx-distributed's examples/training/llama/tp_pp_llama_hf_pretrain/* and examples/training/llama/*.py there"
# NxD loads the pre-sharded weights as the checkpoint tag "pretrained_weight" of --checkpoint_dir.
mkdir -p "\$CKPT_DIR" "\$LOG_DIR" "\$TB_DIR"
if [ "\$(cd "\$CKPT_DIR/pretrained_weight" 2>/dev/null && pwd -P)" != "\$(cd "\$SHARDS" && pwd -P)" ]; then
    [ ! -e "\$CKPT_DIR/pretrained_weight" ] || [ -L "\$CKPT_DIR/pretrained_weight" ] \\
        || fail "\$CKPT_DIR/pretrained_weight exists and is not \$SHARDS"
    ln -sfn "\$SHARDS" "\$CKPT_DIR/pretrained_weight"
fi

# ---- what runs on every node (one srun task per node): torchrun, as in run_llama3_70B_tp_pp.sh -------------------
read -r -d '' NODE_SCRIPT <<'NODE' || true
set -o pipefail
[ -z "\$VENV" ] || source "\$VENV/bin/activate"
cd "\$NXD_DIR"
export FI_EFA_USE_DEVICE_RDMA=1 FI_PROVIDER=efa FI_EFA_FORK_SAFE=1
export XLA_DISABLE_FUNCTIONALIZATION=0 NEURON_FUSE_SOFTMAX=1 NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS=7
export MALLOC_ARENA_MAX=128 XLA_DOWNCAST_BF16=1
export NEURON_CC_FLAGS="--model-type=transformer --cache_dir=\$HOME/cache_dir_neuron/"
# As the seed: keep the rendezvous port out of the ephemeral range (RESERVE_MASTER_PORT=0: leave sysctl alone).
[ "\${RESERVE_MASTER_PORT:-1}" = 0 ] || sudo -n sysctl -w net.ipv4.ip_local_reserved_ports=\$MASTER_PORT >/dev/null 2>&1 || true
NODEID=\$SLURM_NODEID
NNODES=\$SLURM_JOB_NUM_NODES
MASTER_ADDR=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
DISTRIBUTED_ARGS="--nproc_per_node \$PROCESSES_PER_NODE --nnodes \$NNODES --node_rank \$NODEID --master_addr \$MASTER_ADDR --master_port \$MASTER_PORT"
DP=\$((PROCESSES_PER_NODE * NNODES / TP_DEGREE / PP_DEGREE))
BS=\$((GBS / DP))
LOG_PATH=\$LOG_DIR/\$SLURM_JOB_ID/\$NODEID
mkdir -p "\$LOG_PATH"
if [ "\${NEURON_EXTRACT_GRAPHS_ONLY:-0}" = 1 ]; then
    # neuron_parallel_compile: 10 steps to extract the graphs, no weights loaded, no checkpoints.
    max_steps=10 checkpoint_freq=-1 pretrained=0 loading=-1 log=compile.log
else
    max_steps=\$MAX_STEPS checkpoint_freq=\$CHECKPOINT_FREQ pretrained=1 loading=latest_if_exists log=log
fi
echo "Nodeinfo NODEID \$NODEID hostname \$(hostname) \$DISTRIBUTED_ARGS"
torchrun \$DISTRIBUTED_ARGS run_llama_nxd.py \\
    --train_batch_size \$BS \\
    --use_meta_device_init 1 \\
    --training_dir "\$DATA" \\
    --training_config "\$TRAINING_CONFIG" \\
    --max_steps \$max_steps \\
    --seq_len \$SEQ_LEN \\
    --pipeline_parallel_size \$PP_DEGREE \\
    --tensor_parallel_size \$TP_DEGREE \\
    --num_microbatches \$BS \\
    --lr \$LR \\
    --min_lr 1e-06 \\
    --beta1 0.9 \\
    --beta2 0.95 \\
    --weight_decay 0.1 \\
    --warmup_steps \$WARMUP_STEPS \\
    --constant_steps 0 \\
    --use_zero1_optimizer 1 \\
    --use_selective_checkpoint 1 \\
    --use_flash_attention 1 \\
    --qkv_linear \$QKV_LINEAR \\
    --kv_replicator \$KV_REPLICATOR \\
    --fuse_qkv \$FUSE_QKV \\
    --pretrained_weight \$pretrained \\
    --save_load_xser \$SAVE_LOAD_XSER \\
    --checkpoint_dir "\$CKPT_DIR" \\
    --checkpoint_freq \$checkpoint_freq \\
    --num_kept_checkpoint \$NUM_KEPT_CHECKPOINT \\
    --loading_step \$loading \\
    --tb_dir "\$TB_DIR" |& tee -a "\$LOG_PATH/\$log"
exit \${PIPESTATUS[0]}
NODE
export NODE_SCRIPT

# ---- compile the graphs (first run only), then train -------------------------------------------------------------
if [ "\$PRECOMPILE" = 1 ] && [ "\${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    srun --kill-on-bad-exit=1 neuron_parallel_compile bash -c "\$NODE_SCRIPT"
fi
srun --kill-on-bad-exit=1 bash -c "\$NODE_SCRIPT"
EOF
}

if [ "$OUT" = - ]; then
    generate
else
    tmp=$(mktemp "$out_dir/.$(basename "$OUT").XXXXXX") || die "cannot write to $out_dir"
    trap 'rm -f "$tmp"' EXIT
    generate >"$tmp"
    bash -n "$tmp" || die "internal error: the generated script does not parse"
    chmod 0755 "$tmp"
    mv -f "$tmp" "$OUT"
    trap - EXIT
    mkdir -p "$LOG_DIR"  # sbatch opens --output there before the job starts
    echo "write-pretrain-sbatch: wrote $OUT (tp $TP, pp $PP, kv $KV, $NODES nodes, dp $DP); submit with: sbatch $OUT" >&2
fi
