"""hf-fetch against a stand-in Hub (scripts/stand_in_hub.py, started here on 127.0.0.1).

The stand-in is first shown faithful by running the real huggingface_hub client against it (downloads,
layouts, errors, no token at the CDN, a rerun makes one request). Then hf-fetch: byte-identical downloads,
.metadata files huggingface_hub accepts without downloading again, a cache transformers loads offline, resume
after kill -9 without fetching finished ranges again, every injected fault, errors as one line with a fix and
exit code 2, the token never printed or written, unsafe names refused, lying servers caught with nothing under
a final name.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, FIXTURES, ROOT, run

HF_FETCH = BIN / "hf-fetch"
STAND_IN = ROOT / "scripts" / "stand_in_hub.py"
TOKEN = "hf_StandInValidToken0123456789abcdef"
NO_ACCESS = "hf_StandInNoAccessToken0123456789abc"
BAD_TOKEN = "hf_StandInUnknownToken0123456789abcd"
TINY = FIXTURES / "models" / "gqa_llama3"
BIG = 24 << 20


def _random(n, seed):
    out = bytearray()
    h = hashlib.sha256(seed.encode()).digest()
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h * 64
    return bytes(out[:n])


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    base = tmp_path_factory.mktemp("repos")
    weird = base / "weird"
    files = {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
        "tokenizer.json": json.dumps({"vocab": {f"t{i}": i for i in range(3000)}}).encode(),
        "model.safetensors": _random(3 << 20, "model"),
        "tiny.bin": _random(100, "tiny"),
        "big.bin": _random(6 << 20, "big"),
        "empty.txt": b"",
        "sub/notes.txt": b"notes\n",
        "sub/deeper/weird name (1).txt": b"weird\n",
    }
    for rel, data in files.items():
        p = weird / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    big = base / "big"
    big.mkdir()
    (big / "big.bin").write_bytes(_random(BIG, "huge"))
    assert (TINY / "config.json").exists(), "run `make fixtures` first"
    return {"org/weird": weird, "org/gated": weird, "org/private": weird, "org/big": big, "org/tiny": TINY}


class Hub:
    def __init__(self, repos, tmp):
        port_file = tmp / "port"
        cmd = [sys.executable, STAND_IN, "--page-size", "3", "--token", TOKEN, "--token-no-access", NO_ACCESS,
               "--gated", "org/gated", "--private", "org/private", "--rename", "org/old-name=org/weird", "--port", "0", "--port-file", port_file]
        for rid, d in repos.items():
            cmd += ["--repo", f"{rid}={d}"]
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(300):
            if port_file.exists():
                break
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stderr.read().decode())
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text()}"
        self.repos = self._call("GET", "/_control/repos")

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def faults(self, **kw):
        self._call("POST", "/_control/faults", kw)

    def reset(self):
        self._call("POST", "/_control/reset", {})

    def stats(self):
        return self._call("GET", "/_control/stats")

    def log(self):
        return [e for e in self.stats()["log"] if e["path"] != "/api/agent-harnesses"]

    def commit(self, rid):
        return self.repos[rid]["commit"]


@pytest.fixture(scope="module")
def hub(repos, tmp_path_factory):
    h = Hub(repos, tmp_path_factory.mktemp("hub"))
    yield h
    h.proc.terminate()
    h.proc.wait(10)


@pytest.fixture(autouse=True)
def fresh(hub):
    hub.reset()


def env_for(hub, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fetch(hub, tmp_path, *args, check=True, env=None, **kw):
    return run([HF_FETCH, *args], check=check, env=env or env_for(hub, tmp_path), **kw)


def py(hub, tmp_path, code, env=None, python=sys.executable):
    """Runs `code` in a fresh interpreter (so HF_* are read at import) and returns its last stdout line as JSON."""
    p = run([python, "-c", code], env=env or env_for(hub, tmp_path))
    return json.loads(p.stdout.strip().splitlines()[-1])


def same_tree(src, dst, names=None):
    names = names or [str(p.relative_to(src)) for p in Path(src).rglob("*") if p.is_file()]
    for n in names:
        assert (Path(dst) / n).read_bytes() == (Path(src) / n).read_bytes(), n
    return names


def files_under(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file() and ".cache" not in p.parts)


# ---------------------------------------------------------------- the stand-in is faithful

def test_python_client_against_stand_in(hub, repos, tmp_path):
    env = env_for(hub, tmp_path, HF_TOKEN=TOKEN)
    out = tmp_path / "py"
    got = py(hub, tmp_path, f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download("org/weird", local_dir={str(out)!r})))""", env=env)
    assert got == str(out)
    same_tree(repos["org/weird"], out)
    log = hub.log()
    cdn = [e for e in log if e["origin"] == "cdn"]
    assert cdn and all(e["auth"] == "none" for e in cdn), "the client must drop the token at the CDN"
    assert all(e["auth"] == "valid" for e in log if e["origin"] == "hub")
    # The listing is paged (3 entries a page) and the client followed the Link header.
    assert sum("/tree/" in e["path"] for e in log) >= 4
    meta = (out / ".cache/huggingface/download/model.safetensors.metadata").read_text().splitlines()
    e = hub.repos["org/weird"]["files"]["model.safetensors"]
    assert meta[:2] == [hub.commit("org/weird"), e["sha256"]]
    assert (out / ".cache/huggingface/download/config.json.metadata").read_text().splitlines()[1] == \
        hub.repos["org/weird"]["files"]["config.json"]["blob"]
    # A rerun into the same local dir makes exactly one request, the revision call.
    hub.reset()
    py(hub, tmp_path, f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download("org/weird", local_dir={str(out)!r})))""", env=env)
    assert [e["path"] for e in hub.log()] == ["/api/models/org/weird/revision/main"]
    # Cache mode: relative symlinks to blobs named by etag, refs/main without a newline.
    cache = tmp_path / "cache"
    snap = py(hub, tmp_path, f"""
import json
from huggingface_hub import hf_hub_download
print(json.dumps(hf_hub_download("org/weird", "sub/deeper/weird name (1).txt", cache_dir={str(cache)!r})))""", env=env)
    link = Path(snap)
    assert os.readlink(link) == "../../../../blobs/" + hub.repos["org/weird"]["files"]["sub/deeper/weird name (1).txt"]["blob"]
    assert (cache / "models--org--weird/refs/main").read_text() == hub.commit("org/weird")


@pytest.mark.parametrize("repo,token,revision,filename,exception", [
    ("org/gated", None, "main", "config.json", "GatedRepoError"),
    ("org/gated", NO_ACCESS, "main", "config.json", "GatedRepoError"),
    ("org/private", None, "main", "config.json", "RepositoryNotFoundError"),
    ("org/missing", TOKEN, "main", "config.json", "RepositoryNotFoundError"),
    ("org/weird", TOKEN, "nope", "config.json", "RevisionNotFoundError"),
    ("org/weird", TOKEN, "main", "nope.json", "EntryNotFoundError"),
    ("org/weird", BAD_TOKEN, "main", "config.json", "HfHubHTTPError"),
])
def test_python_client_errors(hub, tmp_path, repo, token, revision, filename, exception):
    env = env_for(hub, tmp_path, **({"HF_TOKEN": token} if token else {}))
    got = py(hub, tmp_path, f"""
import json
from huggingface_hub import hf_hub_download
try:
    hf_hub_download({repo!r}, {filename!r}, revision={revision!r}, cache_dir={str(tmp_path / "c")!r})
    print(json.dumps(None))
except Exception as e:
    print(json.dumps([c.__name__ for c in type(e).__mro__] + [getattr(getattr(e, "response", None), "status_code", None)]))""",
             env=env)
    assert got and exception in got, got


# ---------------------------------------------------------------- hf-fetch downloads

def test_local_dir_download_is_identical_and_accepted_by_huggingface_hub(hub, repos, tmp_path):
    out = tmp_path / "out"
    p = fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--chunk-size", "1MiB", "--jobs", "6")
    assert p.stdout.strip() == str(out)
    names = same_tree(repos["org/weird"], out)
    assert files_under(out) == sorted(names)
    commit = hub.commit("org/weird")
    manifest = [json.loads(l) for l in (out / ".cache/huggingface/hf-fetch.manifest.jsonl").read_text().splitlines()]
    assert [m["path"] for m in manifest] == sorted(names)
    for m in manifest:
        data = (out / m["path"]).read_bytes()
        assert (m["bytes"], m["sha256"], m["commit"]) == (len(data), hashlib.sha256(data).hexdigest(), commit)
    for n in names:
        lines = (out / ".cache/huggingface/download" / (n + ".metadata")).read_text().split("\n")
        e = hub.repos["org/weird"]["files"][n]
        assert lines[:2] == [commit, e["sha256"] if e["lfs"] else e["blob"]] and lines[3] == ""
        float(lines[2])
    assert not [p for p in out.rglob("*partial*")] and not [p for p in out.rglob("*resume*")]
    # The big files came as parallel byte ranges.
    ranges = [e["range"] for e in hub.log() if e["origin"] == "cdn" and e.get("file") == "big.bin"]
    assert len(ranges) == 6 and "bytes=0-1048575" in ranges
    # huggingface_hub takes every file as up to date: no HEAD, no GET of a file.
    hub.reset()
    py(hub, tmp_path, f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download("org/weird", local_dir={str(out)!r})))""")
    assert not [e for e in hub.log() if e["scope"] in ("resolve", "cdn")], hub.log()
    # A rerun of hf-fetch fetches nothing either.
    hub.reset()
    fetch(hub, tmp_path, "org/weird", "--local-dir", out)
    assert not [e for e in hub.log() if e["scope"] in ("resolve", "cdn")]


def test_cache_layout_is_found_by_transformers_offline(hub, tmp_path):
    cache = tmp_path / "hub-cache"
    env = env_for(hub, tmp_path, HF_HUB_CACHE=cache)
    p = fetch(hub, tmp_path, "org/tiny", env=env)
    commit = hub.commit("org/tiny")
    snap = cache / "models--org--tiny" / "snapshots" / commit
    assert p.stdout.strip() == str(snap)
    assert (cache / "models--org--tiny/refs/main").read_text() == commit
    for f in snap.rglob("*"):
        if f.is_symlink():
            assert os.readlink(f).startswith("../../blobs/")
    same_tree(TINY, snap)
    hub.reset()
    off = env_for(hub, tmp_path, HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1)
    got = py(hub, tmp_path, f"""
import json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("org/tiny", local_files_only=True)
ref = AutoModelForCausalLM.from_pretrained({str(TINY)!r})
a, b = m.state_dict(), ref.state_dict()
print(json.dumps([len(a), all(torch.equal(a[k], b[k]) for k in b)]))""", env=off)
    assert got[0] > 0 and got[1]
    # hf-fetch offline: no request, the manifest from what is in the cache.
    p = fetch(hub, tmp_path, "org/tiny", "--manifest", "-", env=off)
    assert hub.log() == []
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert {r["path"] for r in rows} == set(files_under(TINY))


def test_manifest_to_stdout_feeds_shard_verify(hub, tmp_path):
    out = tmp_path / "o"
    p = fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--manifest", "-", "--quiet")
    assert len(p.stdout.splitlines()) == 8
    v = run([BIN / "shard-verify", out, "--manifest", "-"], input=p.stdout, check=False)
    assert v.returncode == 0, v.stderr + v.stdout


def test_include_exclude_match_huggingface_hub(hub, tmp_path):
    out = tmp_path / "o"
    fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--include", "*.json", "--include", "sub/*",
          "--exclude", "*notes*")
    assert files_under(out) == ["config.json", "sub/deeper/weird name (1).txt", "tokenizer.json"]
    ref = tmp_path / "ref"
    py(hub, tmp_path, f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download("org/weird", local_dir={str(ref)!r}, allow_patterns=["*.json", "sub/*"],
                                   ignore_patterns=["*notes*"])))""")
    assert files_under(ref) == files_under(out)
    two = tmp_path / "two"
    fetch(hub, tmp_path, "org/weird", "tiny.bin", "sub/notes.txt", "--local-dir", two)
    assert files_under(two) == ["sub/notes.txt", "tiny.bin"]
    plan = fetch(hub, tmp_path, "org/weird", "--local-dir", two, "--dry-run").stdout.splitlines()
    assert "keep tiny.bin 100" in plan and f"download big.bin {6 << 20}" in plan


def test_resume_after_kill_does_not_refetch_finished_ranges(hub, repos, tmp_path):
    out = tmp_path / "o"
    hub.faults(bandwidth=3 << 20)
    proc = subprocess.Popen([str(HF_FETCH), "org/big", "--local-dir", str(out), "--jobs", "4", "--chunk-size",
                             "2MiB", "--quiet"], env=env_for(hub, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    log = None
    deadline = time.time() + 20
    while time.time() < deadline:
        logs = list((out / ".cache/huggingface/download").glob("*.resume")) if out.exists() else []
        if logs and logs[0].read_text().count("\n") >= 8:
            log = logs[0]
            break
        time.sleep(0.05)
    assert log is not None, "no progress recorded"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "big.bin").exists(), "a killed download left a file under its final name"
    header, *records = log.read_text().splitlines()
    chunk = int(header.split()[-1])
    assert header.split()[2:4] == [hub.repos["org/big"]["files"]["big.bin"]["sha256"], str(BIG)]
    chunks = {}
    for line in records:
        i, d = map(int, line.split())
        chunks[i] = max(chunks.get(i, 0), d)
    done = sum(chunks.values())
    assert 0 < done < BIG
    hub.reset()
    t_rerun = time.time()
    fetch(hub, tmp_path, "org/big", "--local-dir", out, "--jobs", "4", "--chunk-size", "2MiB")
    assert (out / "big.bin").read_bytes() == (repos["org/big"] / "big.bin").read_bytes()
    # Bytes the rerun's requests got (the killed run's connections may still be logged after the reset).
    rerun = [e for e in hub.log() if e.get("file") == "big.bin" and e["t"] >= t_rerun]
    served = sum(e["bytes"] for e in rerun)
    assert served == BIG - done, (served, BIG, done)
    starts = [int(e["range"].split("=")[1].split("-")[0]) for e in rerun]
    for i, d in chunks.items():
        if d == chunk:
            assert all(not (i * chunk <= s < (i + 1) * chunk) for s in starts), (i, starts)
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.resume"))


FAULTS = {
    "drop_fin": dict(drop=[{"after": 300_000, "count": 3, "scope": "cdn"}]),
    "drop_rst": dict(drop=[{"after": 300_000, "count": 3, "scope": "cdn", "rst": True}]),
    "5xx_resolve": dict(fail=[{"status": 503, "count": 1, "scope": "resolve"}]),
    "5xx_cdn": dict(fail=[{"status": 500, "count": 2, "scope": "cdn"}]),
    "5xx_api": dict(fail=[{"status": 502, "count": 1, "scope": "api"}]),
    "429": dict(fail=[{"status": 429, "count": 2, "scope": "any", "retry_after": 1}]),
    "stall": dict(stall=[{"after": 200_000, "seconds": 6, "count": 1, "scope": "cdn"}]),
    "ignore_range": dict(ignore_range=True),
    "cdn_url_expired": dict(fail=[{"status": 403, "count": 2, "scope": "cdn"}]),
    "bandwidth": dict(bandwidth=4 << 20),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_faults_are_survived(hub, repos, tmp_path, name):
    hub.faults(**FAULTS[name])
    out = tmp_path / "o"
    t0 = time.time()
    fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--chunk-size", "1MiB", "--jobs", "4",
          env=env_for(hub, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT=1))
    elapsed = time.time() - t0
    same_tree(repos["org/weird"], out)
    log = hub.log()
    if name in ("429",):
        assert sum(e["status"] == 429 for e in log) == 2 and elapsed >= 1
    if name.startswith("drop"):
        assert sum(e["note"] == "drop" for e in log) == 3
    if name == "stall":
        assert elapsed < 6, "a stalled connection must be dropped after the read timeout"
    if name == "cdn_url_expired":
        # Every file is resolved once, and again after each refused (expired) CDN URL.
        assert sum(e["method"] == "HEAD" for e in log) == len(hub.repos["org/weird"]["files"]) + 2
    if name == "ignore_range":
        assert any(e["note"] == "range ignored" for e in log)
    stats = hub.stats()["faults"]
    for kind in ("fail", "drop", "stall"):
        assert all(f.get("count", 1) == 0 for f in stats[kind]), f"{kind} fault not consumed"


ERRORS = [
    ("org/gated", None, [], "is gated and no token was sent", 2),
    ("org/gated", NO_ACCESS, [], "not in its authorized list", 2),
    ("org/private", None, [], "not found", 2),
    ("org/missing", TOKEN, [], "not found", 2),
    ("org/weird", BAD_TOKEN, [], "rejected the token", 2),
    ("org/weird", TOKEN, ["--revision", "nope"], 'revision "nope" not found', 2),
    ("org/weird", TOKEN, ["nope.json"], '"nope.json" not found', 2),
    ("org/../etc", None, [], "invalid repo id", 2),
]


@pytest.mark.parametrize("repo,token,args,message,code", ERRORS)
def test_errors_are_one_line_with_a_fix(hub, tmp_path, repo, token, args, message, code):
    out = tmp_path / "o"
    extra = ["--token", token] if token else []
    p = fetch(hub, tmp_path, repo, "--local-dir", out, *extra, *args, check=False)
    assert p.returncode == code, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-fetch: error: "), p.stderr
    assert message in lines[0] and ("hint:" in lines[0] or "invalid repo id" in message), lines[0]
    assert p.stdout == ""
    assert not files_under(out) if out.exists() else True


def test_gated_repo_with_token_from_env_and_token_file(hub, repos, tmp_path):
    a = tmp_path / "a"
    fetch(hub, tmp_path, "org/gated", "config.json", "--local-dir", a, env=env_for(hub, tmp_path, HF_TOKEN=TOKEN))
    assert (a / "config.json").exists()
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    (home / "token").write_text(TOKEN + "\n")
    b = tmp_path / "b"
    fetch(hub, tmp_path, "org/gated", "--local-dir", b)
    same_tree(repos["org/gated"], b)
    assert all(e["auth"] == "valid" for e in hub.log() if e["origin"] == "hub")


def test_token_is_never_printed_sent_to_the_cdn_or_written(hub, tmp_path):
    out = tmp_path / "o"
    env = env_for(hub, tmp_path, HF_TOKEN=TOKEN)
    texts = []
    for args in (["org/gated", "--local-dir", out, "--manifest", "-"], ["org/gated", "--cache-dir", tmp_path / "c"],
                 ["org/gated", "--local-dir", out, "--revision", "nope"], ["org/gated", "--local-dir", out, "--dry-run"]):
        p = fetch(hub, tmp_path, *args, check=False, env=env)
        texts += [p.stdout, p.stderr]
    p = fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--token", BAD_TOKEN, check=False)
    texts += [p.stdout, p.stderr]
    assert p.returncode == 2
    for t in texts:
        assert TOKEN not in t and BAD_TOKEN not in t and "StandIn" not in t
    for root in (out, tmp_path / "c"):
        for f in root.rglob("*"):
            if f.is_file():
                assert b"StandIn" not in f.read_bytes(), f
    cdn = [e for e in hub.log() if e["origin"] == "cdn"]
    assert cdn and all(e["auth"] == "none" for e in cdn)


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs.txt", "sub/../../escape.txt", "a\nb.txt",
                                  ".cache/huggingface/download/config.json.metadata"])
def test_unsafe_file_names_are_refused(hub, tmp_path, evil):
    hub.faults(evil_paths=[evil])
    out = tmp_path / "d" / "o"
    p = fetch(hub, tmp_path, "org/weird", "--local-dir", out, check=False)
    assert p.returncode == 1 and "refusing the repo file name" in p.stderr, p.stderr
    assert not (tmp_path / "d" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert not out.exists() or files_under(out) == []
    # Excluding it lets the rest through.
    fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--exclude", "*.txt", "--exclude", ".cache/*")
    assert "config.json" in files_under(out)


@pytest.mark.parametrize("lie", [
    dict(lie_size={"big.bin": 100}), dict(lie_size={"big.bin": -100}), dict(lie_size={"config.json": 3}),
    dict(lie_sha=["model.safetensors"]),
])
def test_lying_server_is_caught_and_nothing_is_published(hub, tmp_path, lie):
    hub.faults(**lie)
    out = tmp_path / "o"
    p = fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--chunk-size", "1MiB", check=False)
    assert p.returncode == 1, p.stderr
    victim = next(iter(lie.get("lie_size", {}) or {})) if "lie_size" in lie else "model.safetensors"
    assert victim in p.stderr and ("inconsistent" in p.stderr or "mismatch" in p.stderr), p.stderr
    assert not (out / victim).exists()
    assert not list(out.rglob("*.partial")) or "lie_size" in lie
    hub.reset()
    fetch(hub, tmp_path, "org/weird", "--local-dir", out)
    assert (out / victim).exists()


def test_bad_usage_exits_2(hub, tmp_path):
    p = fetch(hub, tmp_path, "org/weird", "--local-dir", tmp_path / "a", "--cache-dir", tmp_path / "b", check=False)
    assert p.returncode == 2
    p = fetch(hub, tmp_path, "org/weird", "--chunk-size", "lots", check=False)
    assert p.returncode == 2 and "--chunk-size" in p.stderr
    h = fetch(hub, tmp_path, "--help").stdout
    assert "Exit status:" in h and "Examples:" in h and "--local-dir" in h


def test_renamed_repo_is_followed_like_huggingface_hub(hub, repos, tmp_path):
    out = tmp_path / "o"
    fetch(hub, tmp_path, "org/old-name", "--local-dir", out)
    same_tree(repos["org/weird"], out)
    assert any(e["status"] == 307 for e in hub.log())
    ref = tmp_path / "ref"
    py(hub, tmp_path, f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download("org/old-name", local_dir={str(ref)!r})))""")
    assert files_under(ref) == files_under(out)


def test_existing_file_without_metadata_is_hashed_not_downloaded(hub, repos, tmp_path):
    out = tmp_path / "o"
    fetch(hub, tmp_path, "org/weird", "--local-dir", out)
    md = out / ".cache/huggingface/download/big.bin.metadata"
    md.unlink()
    (out / "tiny.bin").write_bytes(b"edited by hand")
    hub.reset()
    fetch(hub, tmp_path, "org/weird", "--local-dir", out)
    fetched = {e.get("file") for e in hub.log() if e["method"] == "GET" and e.get("file")}
    assert fetched == {"tiny.bin"}, fetched
    assert md.exists()
    same_tree(repos["org/weird"], out)


def test_interrupt_exits_130_and_a_rerun_resumes(hub, repos, tmp_path):
    out = tmp_path / "o"
    hub.faults(bandwidth=3 << 20)
    proc = subprocess.Popen([str(HF_FETCH), "org/big", "--local-dir", str(out), "--jobs", "4", "--quiet"],
                            env=env_for(hub, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        logs = list((out / ".cache/huggingface/download").glob("*.resume")) if out.exists() else []
        if logs and logs[0].read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert err.strip().count("\n") == 0 and "interrupted" in err
    assert not (out / "big.bin").exists()
    hub.reset()
    fetch(hub, tmp_path, "org/big", "--local-dir", out)
    assert (out / "big.bin").read_bytes() == (repos["org/big"] / "big.bin").read_bytes()
    assert hub.stats()["served"]["big.bin"] < BIG


@pytest.mark.parametrize("layout", ["--local-dir", "--cache-dir"])
def test_second_run_into_the_same_place_is_refused_while_the_first_runs(hub, repos, tmp_path, layout):
    out = tmp_path / "o"
    hub.faults(bandwidth=3 << 20)
    first = subprocess.Popen([str(HF_FETCH), "org/big", layout, str(out), "--jobs", "4", "--quiet"],
                             env=env_for(hub, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while time.time() < deadline and not any(out.rglob("*.hf-fetch.partial")):
        time.sleep(0.05)
    second = fetch(hub, tmp_path, "org/big", layout, out, "--quiet", check=False)
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and f"another hf-fetch (pid {first.pid})" in second.stderr, second.stderr
    hub.reset()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    # Once the first run is over (the lock goes with the process), a rerun finds everything done.
    again = fetch(hub, tmp_path, "org/big", layout, out, "--quiet")
    assert again.returncode == 0
    big = next(p for p in out.rglob("big.bin"))
    assert big.read_bytes() == (repos["org/big"] / "big.bin").read_bytes()


@pytest.mark.parametrize("variant", ["mirror_cdn", "resolve_cache", "xet", "gzip"])
def test_hub_variants_work_for_both_clients(hub, repos, tmp_path, variant):
    hub.faults(**{variant: True})
    ref = tmp_path / "ref"
    py(hub, tmp_path, f"""
import json
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download("org/weird", local_dir={str(ref)!r})))""")
    same_tree(repos["org/weird"], ref)
    log = hub.log()
    if variant == "resolve_cache":
        assert any(e["path"].startswith("/api/resolve-cache/") for e in log)
    if variant == "mirror_cdn":
        assert any(e["path"].startswith("/cdn/") for e in log) and not any(e["origin"] == "cdn" for e in log)
    if variant == "gzip":
        assert any(e["note"] == "gzip" for e in log)
    hub.reset()
    hub.faults(**{variant: True})
    out = tmp_path / "o"
    fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--chunk-size", "1MiB")
    same_tree(repos["org/weird"], out)
    log = hub.log()
    if variant == "resolve_cache":
        assert any(e["path"].startswith("/api/resolve-cache/") and e["method"] == "GET" for e in log)
    if variant == "mirror_cdn":
        assert any(e["path"].startswith("/cdn/") for e in log)
    if variant == "gzip":
        assert all(e["ae"] == "identity" for e in log if e["scope"] in ("resolve", "cdn"))


def test_huggingface_hub_036_and_hf_transfer_against_stand_in(hub, repos, tmp_path):
    py036 = ROOT / ".venv" / "hub036" / "bin" / "python"
    assert py036.exists(), f"{py036} is missing: run scripts/setup-python.sh (make venv)"
    out, big = tmp_path / "o36", tmp_path / "big.bin"
    got = py(hub, tmp_path, f"""
import json, os, requests, hf_transfer
from huggingface_hub import snapshot_download
out = snapshot_download("org/weird", local_dir={str(out)!r})
loc = requests.head(os.environ["HF_ENDPOINT"] + "/org/big/resolve/main/big.bin", allow_redirects=False).headers["Location"]
hf_transfer.download(url=loc, filename={str(big)!r}, max_files=8, chunk_size=10 * 1024 * 1024)
print(json.dumps(out))""", python=py036)
    assert got == str(out)
    same_tree(repos["org/weird"], out)
    assert big.read_bytes() == (repos["org/big"] / "big.bin").read_bytes()
    ranges = [e["range"] for e in hub.log() if e["origin"] == "cdn" and e.get("file") == "big.bin"]
    # hf_transfer's size probe and its off-by-one last range, which the server clamps.
    assert "bytes=0-0" in ranges and f"bytes={20 << 20}-{BIG}" in ranges, ranges
    assert all(e["auth"] == "none" for e in hub.log() if e["origin"] == "cdn")


def test_offline_local_dir_reports_what_is_there_without_network(hub, repos, tmp_path):
    out = tmp_path / "o"
    fetch(hub, tmp_path, "org/weird", "--local-dir", out)
    hub.reset()
    p = fetch(hub, tmp_path, "org/weird", "--local-dir", out, "--manifest", "-",
              env=env_for(hub, tmp_path, HF_HUB_OFFLINE=1))
    assert hub.log() == []
    assert sorted(json.loads(l)["path"] for l in p.stdout.splitlines()) == files_under(repos["org/weird"])
    p = fetch(hub, tmp_path, "org/weird", "--local-dir", tmp_path / "empty", check=False,
              env=env_for(hub, tmp_path, HF_HUB_OFFLINE=1))
    assert p.returncode == 2 and "HF_HUB_OFFLINE" in p.stderr and "hint:" in p.stderr


def test_full_disk_is_exit_3_with_the_fix_and_nothing_under_a_final_name(hub, repos, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5M", "tmpfs", str(small)], check=True)
    try:
        p = fetch(hub, tmp_path, "org/weird", "--local-dir", small / "out", check=False)
        assert p.returncode == 3, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left" in lines[0] and "free space" in lines[0], p.stderr
        for name in files_under(small / "out"):
            assert (small / "out" / name).read_bytes() == (repos["org/weird"] / name).read_bytes(), name
    finally:
        subprocess.run(["umount", str(small)], check=True)
