"""The tools under a real Slurm (scripts/slurm-up.sh brings up a single-node cluster: Debian's slurmctld, slurmd and
munge). Every test FAILS, naming the fix, when Slurm is not up: they are part of `make test`, not optional.

Checked, byte for byte against one process on the same inputs:
* an `sbatch --array` of nx-shard tasks (each takes its slice from SLURM_ARRAY_TASK_ID/COUNT, nx-shard's default),
  and `srun` steps inside one job (SLURM_PROCID/NTASKS): the same shard files, and per-rank manifests whose union
  is the one-process manifest;
* an `sbatch --array` of tok-pack tasks, then `tok-pack --merge` as a job depending on the array (afterok): the same
  dataset directory;
* a conversion job killed mid-run (scancel; SIGKILL of the task) leaves only complete files under final names, and
  resubmitted or requeued (`scontrol requeue`) it resumes, keeping the finished files, and ends with the same bytes;
* the pipeline's sbatch script (scripts/write-pretrain-sbatch.sh) is accepted by `sbatch --test-only`, and run on
  this cluster with stand-ins for torchrun and neuron_parallel_compile it launches run_llama_nxd.py with the layout,
  `--pretrained_weight 1`, the shards as the checkpoint tag pretrained_weight and the dataset.
Every sbatch --wait / srun is bounded by `timeout`; jobs get --time."""
import filecmp
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, FIXTURES, ROOT, run

NX_SHARD = BIN / "nx-shard"
TOK_PACK = BIN / "tok-pack"
TOKENIZER = FIXTURES / "tokenizer"
WRITE_SBATCH = ROOT / "scripts" / "write-pretrain-sbatch.sh"
PY = os.environ.get("PYTHON", str(ROOT / ".venv" / "current" / "bin" / "python"))
SHARD_NAME = re.compile(r"^dp_rank_\d\d_tp_rank_\d\d_pp_rank_\d\d\.pt$")
UP_STATES = ("idle", "mixed", "allocated", "completing")


def slurm_env(**extra):
    """The environment for sbatch/srun: without the Slurm variables of an enclosing allocation (sbatch and srun
    read SLURM_*/SBATCH_* as options), keeping SLURM_CONF."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    if "SLURM_CONF" in os.environ:
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module", autouse=True)
def slurm_is_up():
    missing = [c for c in ("sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel") if not shutil.which(c)]
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} not on PATH): run scripts/slurm-up.sh (as root)",
                    pytrace=False)
    p = subprocess.run(["timeout", "10", "sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=slurm_env())
    states = [s.rstrip("*~#!%$@^-") for s in p.stdout.split()]
    if p.returncode != 0 or not any(s in UP_STATES for s in states):
        why = (p.stderr.strip() or p.stdout.strip() or f"sinfo exited {p.returncode}").splitlines()[-1]
        pytest.fail(f"Slurm is not up ({why}): run scripts/slurm-up.sh (as root)", pytrace=False)
    for exe in (NX_SHARD, TOK_PACK):
        if not exe.exists():
            pytest.fail(f"{exe} is missing: run `make build`", pytrace=False)
    if not (FIXTURES / "models" / "gqa_7l_tied").exists() or not TOKENIZER.exists():
        pytest.fail(f"fixtures missing under {FIXTURES}: run `make fixtures`", pytrace=False)


# ---- Slurm helpers ---------------------------------------------------------------------------------------------------

def logs(d: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(d.glob("*.out")))


def sbatch(workdir: Path, *args, wait=True, timeout=180, env=None):
    """Submits a batch job (--parsable, --time=10 min, working directory `workdir`); with `wait`, under
    `timeout` and `sbatch --wait`. Returns (job id, exit status: the job's, or the highest of an array's)."""
    cmd = ["timeout", str(timeout), "sbatch", "--parsable", "--time=10", "-D", str(workdir),
           *(["--wait"] if wait else []), *[str(a) for a in args]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env or slurm_env())
    job = p.stdout.strip().split(";")[0] if p.stdout.strip() else None
    if p.returncode == 124:
        if job:
            subprocess.run(["timeout", "20", "scancel", job], env=slurm_env())
        raise AssertionError(f"sbatch --wait timed out after {timeout}s (job {job}):\n{logs(workdir)}")
    if job is None:
        raise AssertionError(f"{cmd} did not submit (exit {p.returncode}):\n{p.stderr}")
    return job, p.returncode


def job_records(job):
    """scontrol show job -o: one dict per job (one per task of an array), or [] once purged."""
    p = subprocess.run(["timeout", "10", "scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                       env=slurm_env())
    out = []
    for line in p.stdout.splitlines():
        out.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return out


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_state(job, states, timeout=120, restarts=None):
    """Waits until the job is in one of `states` (and, with `restarts`, has been restarted that many times)."""
    def check():
        recs = job_records(job)
        if not recs or recs[0].get("JobState") not in states:
            return None
        return recs[0] if restarts is None or recs[0].get("Restarts") == restarts else None
    try:
        return wait_for(check, timeout, f"job {job} to reach {states}")
    except AssertionError:
        subprocess.run(["timeout", "20", "scancel", job], env=slurm_env())
        raise


def left_queue(job):
    p = subprocess.run(["timeout", "10", "squeue", "-h", "-j", job], capture_output=True, text=True, env=slurm_env())
    return p.returncode == 0 and not p.stdout.strip()


def shell(*words):
    return " ".join(f"'{w}'" if re.search(r"[^\w/.,:=+-]", str(w)) else str(w) for w in words)


# ---- comparisons -----------------------------------------------------------------------------------------------------

def tree(d: Path):
    """Every file (bytes) and directory under d/model."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else "<dir>") for p in sorted((d / "model").rglob("*"))}


def partials(d: Path):
    return [p for p in d.rglob("*") if ".partial" in p.name or p.name.startswith(".tmp")]


def manifest(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_rank_manifests(single: Path, multi: Path, world: int):
    want = sorted(manifest(single / "nx-shard.manifest.jsonl"), key=lambda m: m["path"])
    ranks = sorted(multi.glob("nx-shard.manifest.rank-*-of-*.jsonl"))
    assert [p.name for p in ranks] == [f"nx-shard.manifest.rank-{r}-of-{world}.jsonl" for r in range(world)]
    union = []
    for p in ranks:
        rows = manifest(p)
        assert rows, f"{p.name} is empty: rank got no files"
        union += rows
    paths = [m["path"] for m in union]
    assert len(paths) == len(set(paths)), "a file is in two ranks' manifests"
    assert sorted(union, key=lambda m: m["path"]) == want
    for m in union:
        f = multi / m["path"]
        if f.is_file():
            assert f.stat().st_size == m["bytes"] and hashlib.sha256(f.read_bytes()).hexdigest() == m["sha256"]


def final_shards(out: Path):
    d = out / "model"
    return sorted(p for p in d.iterdir() if SHARD_NAME.match(p.name)) if d.exists() else []


# ---- nx-shard --------------------------------------------------------------------------------------------------------

NX_LAYOUTS = {
    # uneven pp (7 layers over 3 stages), kv heads replicated, xser form (.pt.tensors/ dirs)
    "7l-tied-xser": ("gqa_7l_tied", ["--tp", 8, "--pp", 3, "--qkv-linear", "--kv-size-multiplier", 2, "--xser"]),
    # the seed's 70B flags on a tiny Llama 3: qkv_linear, kv multiplier 4, fused qkv
    "llama3-fused": ("gqa_llama3", ["--tp", 8, "--pp", 2, "--qkv-linear", "--kv-size-multiplier", 4, "--fuse-qkv"]),
}


@pytest.mark.parametrize("layout", NX_LAYOUTS)
def test_nx_shard_array_equals_one_process(tmp_path, layout):
    model, flags = NX_LAYOUTS[layout]
    src = FIXTURES / "models" / model
    single, multi = tmp_path / "single", tmp_path / "multi"
    run([NX_SHARD, "--input", src, "--output", single, *flags, "-q"], env=slurm_env())
    # No --rank/--world: every task takes its slice from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
    job, rc = sbatch(tmp_path, "--array=0-3", "-o", tmp_path / "nx-%A_%a.out",
                     "--wrap", "exec " + shell(NX_SHARD, "--input", src, "--output", multi, *flags, "-j", 1, "-q"))
    assert rc == 0, logs(tmp_path)
    assert [r.get("JobState") for r in job_records(job)] == ["COMPLETED"] * 4
    assert tree(multi) == tree(single)
    assert_rank_manifests(single, multi, 4)
    assert not partials(multi)


def test_nx_shard_srun_steps_equal_one_process(tmp_path):
    """Inside one job: `srun -n 3` gives each step its slice from SLURM_PROCID / SLURM_NTASKS."""
    model, flags = NX_LAYOUTS["7l-tied-xser"]
    src = FIXTURES / "models" / model
    single, multi = tmp_path / "single", tmp_path / "multi"
    run([NX_SHARD, "--input", src, "--output", single, *flags, "-q"], env=slurm_env())
    job, rc = sbatch(tmp_path, "-n", 2, "-o", tmp_path / "srun-%j.out", "--wrap",
                     "timeout 120 srun -O -n 3 " + shell(NX_SHARD, "--input", src, "--output", multi, *flags, "-j", 1,
                                                         "-q"))
    assert rc == 0, logs(tmp_path)
    assert tree(multi) == tree(single)
    assert_rank_manifests(single, multi, 3)


def test_batch_step_without_srun_is_one_process(tmp_path, corpus):
    """In the batch script itself (sbatch -n 2, no srun) SLURM_PROCID=0 and SLURM_NTASKS=2 are set, but there is
    one process: both tools must do the whole job, not a half."""
    model, flags = NX_LAYOUTS["7l-tied-xser"]
    src = FIXTURES / "models" / model
    single, batch = tmp_path / "single", tmp_path / "batch"
    run([NX_SHARD, "--input", src, "--output", single, *flags, "-q"], env=slurm_env())
    run([TOK_PACK, "--tokenizer", TOKENIZER, "--input", corpus, "--output", tmp_path / "ds1", "--block-size", 512,
         "-q"], env=slurm_env())
    job, rc = sbatch(tmp_path, "-n", 2, "-o", tmp_path / "batch-%j.out", "--wrap",
                     shell(NX_SHARD, "--input", src, "--output", batch, *flags, "-q") + " && " +
                     shell(TOK_PACK, "--tokenizer", TOKENIZER, "--input", corpus, "--output", tmp_path / "ds2",
                           "--block-size", 512, "-q"))
    assert rc == 0, logs(tmp_path)
    assert tree(batch) == tree(single)
    assert (batch / "nx-shard.manifest.jsonl").read_bytes() == (single / "nx-shard.manifest.jsonl").read_bytes()
    assert not list(tmp_path.glob("ds2.rank-*"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds1").iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "ds2").iterdir()}


# ---- tok-pack --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 1 MB of real English text as one JSON line per paragraph: several thousand documents, so several
    1000-document batches to share between ranks."""
    d = tmp_path_factory.mktemp("slurm-corpus")
    raw = d / "raw.jsonl"
    run([PY, ROOT / "scripts" / "make-corpus.py", raw, "--mb", 1])
    out = d / "corpus.jsonl"
    n = 0
    with raw.open() as f, out.open("w") as g:
        for line in f:
            for para in json.loads(line)["text"].split("\n\n"):
                g.write(json.dumps({"text": para}) + "\n")
                n += 1
    assert n > 3000, n
    return out


@pytest.mark.parametrize("mode", [["--compat", "nxd"], []], ids=["nxd", "default"])
def test_tok_pack_array_then_merge_equals_one_process(tmp_path, corpus, mode):
    common = ["--block-size", 512, "--max-shard-size", "1MB", *mode]
    single, multi = tmp_path / "single", tmp_path / "multi"
    run([TOK_PACK, "--tokenizer", TOKENIZER, "--input", corpus, "--output", single, *common, "-q"], env=slurm_env())
    assert len(list(single.glob("data-*.arrow"))) > 1
    # No --rank/--world: every task takes its share from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
    array, _ = sbatch(tmp_path, "--array=0-2", "-o", tmp_path / "tok-%A_%a.out", "--wrap",
                      "exec " + shell(TOK_PACK, "--tokenizer", TOKENIZER, "--input", corpus, "--output", multi,
                                      *common, "-j", 1, "-q"), wait=False)
    # The merge runs after every task succeeded; a failed task cancels it (kill_invalid_depend) and sbatch --wait
    # then returns non-zero. The merge takes --max-shard-size from the partial results.
    merge, rc = sbatch(tmp_path, f"--dependency=afterok:{array}", "-o", tmp_path / "merge-%j.out", "--wrap",
                       shell(TOK_PACK, "--merge") + f" {multi}.rank-* " + shell("--output", multi, "-q"))
    assert rc == 0, logs(tmp_path)
    assert [r.get("JobState") for r in job_records(array)] == ["COMPLETED"] * 3
    assert len(list(tmp_path.glob("multi.rank-*-of-00003"))) == 3
    a = {p.name: p.read_bytes() for p in single.iterdir()}
    b = {p.name: p.read_bytes() for p in multi.iterdir()}
    assert sorted(a) == sorted(b) and a == b


# ---- killed and requeued ---------------------------------------------------------------------------------------------

BIG_FLAGS = ["--tp", 8, "--pp", 4, "--qkv-linear", "-q"]
# A Llama-architecture checkpoint of about 1 GB (32 heads, 8 kv heads, hidden 2048, 8 layers, vocab 32000, bf16):
# nx-shard -j 1 takes seconds on it, so a job can be killed mid-run. `make fixtures` has only tiny models (the
# optional gqa_large takes ~25 s to generate), so it is written here in about a second; the tensor values are
# pseudo-random bytes, which nx-shard only copies.
BIG_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 8,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_big_model(d: Path):
    c = BIG_CONFIG
    h, kv, inter, v = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": [v, h]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                       p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                       p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
                       p + "mlp.down_proj.weight": [h, inter], p + "input_layernorm.weight": [h],
                       p + "post_attention_layernorm.weight": [h]})
    shapes.update({"model.norm.weight": [h], "lm_head.weight": [v, h]})
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for k, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[k] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    block = random.Random(0).randbytes(1 << 22)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(c, indent=2))
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = off
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return d


@pytest.fixture(scope="module")
def big_reference(tmp_path_factory):
    """The 1 GB model, and one uninterrupted nx-shard run on it (32 files of about 30 MB)."""
    root = tmp_path_factory.mktemp("slurm-big")
    src = write_big_model(root / "model")
    ref = root / "ref"
    run([NX_SHARD, "--input", src, "--output", ref, *BIG_FLAGS], env=slurm_env())
    yield src, ref
    shutil.rmtree(root, ignore_errors=True)


def assert_complete_files_only(out: Path, ref: Path):
    for f in final_shards(out):
        assert filecmp.cmp(f, ref / "model" / f.name, shallow=False), f"{f.name} under its final name is incomplete"


def assert_same_as_reference(out: Path, ref: Path):
    names = [f.name for f in final_shards(out)]
    assert names == [f.name for f in final_shards(ref)]
    for n in names:
        assert filecmp.cmp(out / "model" / n, ref / "model" / n, shallow=False), n
    assert not partials(out)
    assert sorted(manifest(out / "nx-shard.manifest.jsonl"), key=lambda m: m["path"]) == \
        sorted(manifest(ref / "nx-shard.manifest.jsonl"), key=lambda m: m["path"])


def kept_count(log: str) -> int:
    m = re.findall(r"kept (\d+) existing", log)
    return int(m[-1]) if m else -1


def test_cancelled_job_resubmitted_resumes(tmp_path, big_reference):
    big, big_reference = big_reference
    out = tmp_path / "out"
    cmd = "exec " + shell(NX_SHARD, "--input", big, "--output", out, *BIG_FLAGS, "-j", 1)
    try:
        job, _ = sbatch(tmp_path, "-o", tmp_path / "first-%j.out", "--wrap", cmd, wait=False)
        wait_for(lambda: len(final_shards(out)) >= 2, 60, "the first shard files")
        run(["timeout", "20", "scancel", job], env=slurm_env())
        rec = wait_state(job, ("CANCELLED",), 60)
        wait_for(lambda: left_queue(job), 60, f"job {job} to leave the queue")
        done = len(final_shards(out))
        assert 2 <= done < 32, f"{done} files: the job was not killed mid-run ({rec})"
        assert_complete_files_only(out, big_reference)
        # Resubmitted: the finished files are kept, the rest written.
        job2, rc = sbatch(tmp_path, "-o", tmp_path / "second-%j.out", "--wrap", cmd)
        assert rc == 0, logs(tmp_path)
        assert kept_count((tmp_path / f"second-{job2}.out").read_text()) >= done, logs(tmp_path)
        assert_same_as_reference(out, big_reference)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_killed_task_requeued_resumes(tmp_path, big_reference):
    big, big_reference = big_reference
    out, pid_file, log = tmp_path / "out", tmp_path / "task.pid", tmp_path / "job.out"
    job = None
    cmd = f"echo $$ > {pid_file}; echo restart=${{SLURM_RESTART_COUNT:-0}}; exec " + \
        shell(NX_SHARD, "--input", big, "--output", out, *BIG_FLAGS, "-j", 1)
    try:
        job, _ = sbatch(tmp_path, "--requeue", "--open-mode=append", "-o", log, "--wrap", cmd, wait=False)
        wait_for(lambda: len(final_shards(out)) >= 2, 60, "the first shard files")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the task dies mid-run (node crash, OOM killer)
        rec = wait_state(job, ("FAILED", "NODE_FAIL", "CANCELLED"), 60)
        wait_for(lambda: left_queue(job), 60, f"job {job} to finish completing")
        done = len(final_shards(out))
        assert 2 <= done < 32, f"{done} files: the task was not killed mid-run ({rec})"
        assert_complete_files_only(out, big_reference)
        # Requeued: same job id, run again from the top of the script. Slurm delays a requeued job's start by
        # about 2 minutes; StartTime=now lifts that. Right after a kill, slurmd may still refuse to launch the job
        # ("Job N already killed, do not launch batch job": the requeued run fails before the script starts, so
        # no new line in the log); an operator requeues again, and so does the test, at most three times.
        for attempt in range(1, 4):
            time.sleep(2)
            run(["timeout", "20", "scontrol", "requeue", job], env=slurm_env())
            run(["timeout", "20", "scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env())
            rec = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 120, restarts=str(attempt))
            if rec["JobState"] == "COMPLETED" or f"restart={attempt}" in log.read_text():
                break
            wait_for(lambda: left_queue(job), 60, f"job {job} to finish completing")
        assert rec["JobState"] == "COMPLETED", (rec, log.read_text())
        text = log.read_text()
        assert "restart=0" in text and f"restart={attempt}" in text, text
        assert kept_count(text) >= done, text
        assert_same_as_reference(out, big_reference)
    finally:
        if job:
            subprocess.run(["timeout", "20", "scancel", job], env=slurm_env())
        shutil.rmtree(out, ignore_errors=True)


# ---- the pipeline's sbatch script --------------------------------------------------------------------------------------

def test_pretrain_sbatch_script_seed_defaults_pass_test_only(tmp_path):
    """The seed layout (70B: tp 32, pp 8, kv multiplier 4, qkv_linear, fuse_qkv, 8192, 16 nodes); --test-only with
    --nodes=1 on the command line (this cluster has one node) checks every other directive."""
    script = tmp_path / "pretrain.sbatch"
    run([WRITE_SBATCH, "--model-dir", tmp_path / "Meta-Llama-3-70B", "--shards", tmp_path / "nxd",
         "--data", tmp_path / "wiki_8k", "--out", script])
    text = script.read_text()
    for want in ("#SBATCH --nodes=16", "#SBATCH --exclusive", "TP_DEGREE=32 PP_DEGREE=8 KV_REPLICATOR=4 QKV_LINEAR=1 "
                 "FUSE_QKV=1 SAVE_LOAD_XSER=1", "SEQ_LEN=8192", "neuron_parallel_compile", "torchrun",
                 "run_llama_nxd.py", "--pretrained_weight $pretrained", "--kv_replicator $KV_REPLICATOR",
                 "--fuse_qkv $FUSE_QKV", "--qkv_linear $QKV_LINEAR", "--seq_len $SEQ_LEN"):
        assert want in text, want
    run(["bash", "-n", script])
    p = subprocess.run(["timeout", "30", "sbatch", "--test-only", "--nodes=1", str(script)], capture_output=True,
                       text=True, env=slurm_env(), cwd=tmp_path)
    assert p.returncode == 0 and "to start at" in p.stderr, p.stderr
    # Refused: usage errors exit 2 and write nothing.
    for bad in (["--tp", 32, "--pp", 8, "--nodes", 3], ["--gbs", 1000, "--nodes", 24], ["--fuse-qkv", 1, "--qkv-linear", 0]):
        q = run([WRITE_SBATCH, "--model-dir", "m", "--shards", "s", "--data", "d", "--out", tmp_path / "bad", *bad],
                check=False)
        assert q.returncode == 2 and "error:" in q.stderr and not (tmp_path / "bad").exists(), (bad, q.stderr)


STUB_TORCHRUN = """#!/bin/sh
{ echo "cwd=$PWD extract=${NEURON_EXTRACT_GRAPHS_ONLY:-0} node=$SLURM_NODEID"; printf '%s\\n' "$@"; echo ---; } >> "$STUB_RECORD"
"""
STUB_COMPILE = """#!/bin/sh
NEURON_EXTRACT_GRAPHS_ONLY=1 exec "$@"
"""


def test_pretrain_sbatch_script_launches_run_llama_nxd(tmp_path, corpus):
    """A one-node variant run for real under Slurm, with stand-ins for torchrun and neuron_parallel_compile that
    record how they were called: compile pass (graphs only, no weights), then training from the shards."""
    shards, data, nxd, bin_dir = tmp_path / "nxd", tmp_path / "data", tmp_path / "nxd-examples", tmp_path / "bin"
    model = FIXTURES / "models" / "gqa_7l_tied"
    run([NX_SHARD, "--input", model, "--output", shards, "--tp", 8, "--pp", 4, "--qkv-linear",
         "--kv-size-multiplier", 2, "--xser", "-q"])
    run([TOK_PACK, "--tokenizer", TOKENIZER, "--input", corpus, "--output", data, "--block-size", 512,
         "--compat", "nxd", "-q"])
    nxd.mkdir()
    (nxd / "run_llama_nxd.py").write_text("raise SystemExit('stand-in')\n")
    bin_dir.mkdir()
    for name, body in (("torchrun", STUB_TORCHRUN), ("neuron_parallel_compile", STUB_COMPILE)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "torchrun.calls"
    script = tmp_path / "pretrain.sbatch"
    run([WRITE_SBATCH, "--model-dir", model, "--shards", shards, "--data", data, "--out", script,
         "--tp", 8, "--pp", 4, "--kv-multiplier", 2, "--fuse-qkv", 0, "--seq-len", 512, "--nodes", 1,
         "--gbs", 64, "--nxd-dir", nxd, "--max-steps", 20, "--checkpoint-freq", 10])
    env = slurm_env(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_RECORD=record, RESERVE_MASTER_PORT=0)
    p = subprocess.run(["timeout", "30", "sbatch", "--test-only", str(script)], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0 and "to start at" in p.stderr, p.stderr
    job, rc = sbatch(tmp_path, script, env=env, timeout=120)
    out = (tmp_path / "logs" / f"pretrain-llama-{job}.out")
    assert rc == 0, out.read_text() if out.exists() else logs(tmp_path)
    calls = [c.strip().splitlines() for c in record.read_text().split("---\n") if c.strip()]
    assert len(calls) == 2, calls

    def opts(call):
        args = call[1:]
        return {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--") and i + 1 < len(args)}, args

    for call, extract in zip(calls, ("1", "0")):
        assert call[0] == f"cwd={nxd} extract={extract} node=0", call[0]
        o, args = opts(call)
        assert args[args.index("run_llama_nxd.py") - 10:args.index("run_llama_nxd.py")] == \
            ["--nproc_per_node", "32", "--nnodes", "1", "--node_rank", "0", "--master_addr", o["--master_addr"],
             "--master_port", "44000"]
        assert (o["--tensor_parallel_size"], o["--pipeline_parallel_size"], o["--kv_replicator"], o["--qkv_linear"],
                o["--fuse_qkv"], o["--seq_len"], o["--save_load_xser"]) == ("8", "4", "2", "1", "0", "512", "1")
        assert o["--train_batch_size"] == o["--num_microbatches"] == "64"  # dp 1 -> the whole global batch
        assert o["--training_dir"] == str(data) and o["--training_config"] == str(model)
    compile_opts, train_opts = opts(calls[0])[0], opts(calls[1])[0]
    assert (compile_opts["--pretrained_weight"], compile_opts["--max_steps"], compile_opts["--loading_step"]) == \
        ("0", "10", "-1")
    assert (train_opts["--pretrained_weight"], train_opts["--max_steps"], train_opts["--checkpoint_freq"],
            train_opts["--loading_step"]) == ("1", "20", "10", "latest_if_exists")
    # NxD loads --pretrained_weight 1 from <checkpoint_dir>/pretrained_weight/model/dp_rank_*.pt.
    tag = Path(train_opts["--checkpoint_dir"]) / "pretrained_weight"
    assert sorted(p.name for p in (tag / "model").glob("*.pt")) == sorted(p.name for p in final_shards(shards))

    # Missing inputs fail at once (exit 2) with the reason, before any compilation.
    (data / "state.json").unlink()
    record.unlink()
    job, rc = sbatch(tmp_path, script, env=env, timeout=120)
    text = (tmp_path / "logs" / f"pretrain-llama-{job}.out").read_text()
    assert rc == 2 and "not a datasets save_to_disk directory" in text and not record.exists(), text
