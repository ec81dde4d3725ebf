#!/usr/bin/env python3
"""A stand-in Hugging Face Hub for tests and benchmarks (Python stdlib only, 127.0.0.1 only).

Serves repos from local directories with the Hub's download protocol: revision and tree API
(paged with Link headers), /resolve with HEAD/GET, Range, ETag/X-Linked-* headers, LFS files
redirected (302) to a separate "CDN" origin with HMAC-signed expiring URLs that refuses an
Authorization header, X-Error-Code errors (RepoNotFound, GatedRepo, RevisionNotFound,
EntryNotFound, invalid token), RateLimit headers, and fault injection.

    python scripts/stand_in_hub.py --repo org/tiny=fixtures/models/gqa_llama3 --port 0 --port-file /tmp/port

Faults are set with flags or at runtime with POST /_control/faults (JSON, same keys as below);
GET /_control/stats gives the request log and bytes served per file; POST /_control/reset
clears faults and statistics.

  fail:      [{"status": 503, "count": 2, "scope": "any|api|resolve|cdn", "method": "GET", "path": "substr"}]
  drop:      [{"after": 1048576, "count": 1, "scope": "cdn", "rst": false}]   close after N body bytes
  stall:     [{"after": 1048576, "seconds": 5, "count": 1, "scope": "cdn"}]
  bandwidth: bytes/s per connection (0 = unlimited); ignore_range: true|false
  lie_size:  {"path": delta}  the listing and /resolve report size+delta
  lie_sha:   ["path"]          the listing and /resolve report another content hash
  evil_paths: ["../x"]         extra tree entries with these (unsafe) names
  mirror_cdn, resolve_cache, xet, gzip: true|false   Hub variants: LFS redirects to /cdn/ on the Hub origin;
                               regular files via a relative 307 to /api/resolve-cache/...; Xet headers (no CAS);
                               regular files gzip+chunked to clients that accept gzip
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth",
    ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst", ".gguf",
)
SECRET = os.urandom(16)


def git_blob_sha1(size, chunks):
    h = hashlib.sha1(b"blob %d\0" % size)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def read_chunks(path, n=1 << 20):
    with open(path, "rb") as f:
        while True:
            b = f.read(n)
            if not b:
                return
            yield b


class Repo:
    def __init__(self, repo_id, root, kind="model", lfs_threshold=10 << 20, hash_cache=None):
        self.id, self.root, self.kind = repo_id, os.path.abspath(root), kind
        self.gated = self.private = False
        self.files = {}
        cache = {}
        if hash_cache and os.path.exists(hash_cache):
            try:
                cache = json.load(open(hash_cache))
            except ValueError:
                cache = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                st = os.stat(full)
                key = f"{full}:{st.st_size}:{st.st_mtime_ns}"
                if key in cache:
                    sha256, sha1 = cache[key]
                else:
                    h256 = hashlib.sha256()
                    h1 = hashlib.sha1(b"blob %d\0" % st.st_size)
                    for c in read_chunks(full):
                        h256.update(c)
                        h1.update(c)
                    sha256, sha1 = h256.hexdigest(), h1.hexdigest()
                    cache[key] = [sha256, sha1]
                lfs = st.st_size >= lfs_threshold or name.endswith(LFS_SUFFIXES)
                entry = {"path": rel, "full": full, "size": st.st_size, "sha256": sha256, "blob": sha1, "lfs": lfs}
                if lfs:
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {st.st_size}\n".encode()
                    entry["oid"] = git_blob_sha1(len(pointer), [pointer])
                else:
                    entry["oid"] = sha1
                self.files[rel] = entry
        if hash_cache:
            with open(hash_cache, "w") as f:
                json.dump(cache, f)
        listing = "".join(f"{p} {e['oid']}\n" for p, e in sorted(self.files.items()))
        self.commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        dirs = set()
        for p in self.files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        self.dirs = sorted(dirs)


class State:
    def __init__(self, args):
        self.lock = threading.Lock()
        self.repos = {}
        self.renamed = {}
        self.tokens = set(args.token or [])
        self.no_access_tokens = set(args.token_no_access or [])
        self.page_size = args.page_size
        self.mirror_cdn_default = args.mirror_cdn
        self.cdn_lifetime = args.cdn_lifetime
        self.cdn_rejects_auth = not args.cdn_allows_auth
        self.hub_port = self.cdn_port = 0
        self.log_file = open(args.log, "a") if args.log else None
        self.reset()

    def reset(self):
        with self.lock:
            self.faults = {"fail": [], "drop": [], "stall": [], "bandwidth": 0, "ignore_range": False,
                           "lie_size": {}, "lie_sha": [], "evil_paths": [],
                           "mirror_cdn": self.mirror_cdn_default, "resolve_cache": False, "xet": False,
                           "gzip": False}
            self.log = []
            self.served = {}

    def set_faults(self, d):
        with self.lock:
            for k in ("fail", "drop", "stall"):
                if k in d:
                    self.faults[k] = [dict(x) for x in d[k]]
            for k in ("bandwidth", "ignore_range", "lie_size", "lie_sha", "evil_paths", "mirror_cdn", "resolve_cache",
                      "xet", "gzip"):
                if k in d:
                    self.faults[k] = d[k]

    def take(self, kind, scope, method, path, body_len=None):
        """Consumes one matching fault of `kind`, or returns None."""
        with self.lock:
            for f in self.faults[kind]:
                if f.get("count", 1) <= 0:
                    continue
                if f.get("scope", "any") not in ("any", scope):
                    continue
                if f.get("method") and f["method"] != method:
                    continue
                if f.get("path") and f["path"] not in path:
                    continue
                if body_len is not None and body_len <= f.get("after", 0):
                    continue
                f["count"] = f.get("count", 1) - 1
                return dict(f)
        return None

    def record(self, entry):
        with self.lock:
            entry["seq"] = len(self.log)
            self.log.append(entry)
            if entry.get("file"):
                self.served[entry["file"]] = self.served.get(entry["file"], 0) + entry.get("bytes", 0)
            if self.log_file:
                self.log_file.write(json.dumps(entry) + "\n")
                self.log_file.flush()


def sign(path, expires):
    return hmac.new(SECRET, f"{path}:{expires}".encode(), hashlib.sha256).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stand-in-hub"
    is_cdn = False

    def log_message(self, *a):
        pass

    # ---------- plumbing ----------
    @property
    def st(self):
        return self.server.state

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def auth_class(self):
        a = self.headers.get("Authorization")
        if not a:
            return "none"
        tok = a[7:] if a.lower().startswith("bearer ") else a
        if tok in self.st.tokens:
            return "valid"
        if tok in self.st.no_access_tokens:
            return "no-access"
        return "invalid"

    def start_entry(self, scope):
        self._entry = {"t": time.time(), "origin": "cdn" if self.is_cdn else "hub", "scope": scope,
                       "method": self.command, "path": self.path, "range": self.headers.get("Range"),
                       "auth": self.auth_class(), "ua": self.headers.get("User-Agent"),
                       "ae": self.headers.get("Accept-Encoding"), "bytes": 0, "status": None, "note": None}
        return self._entry

    def finish_entry(self):
        e = getattr(self, "_entry", None)
        if e is not None:
            self.st.record(e)
            self._entry = None

    def hub_headers(self):
        self.send_header("RateLimit", '"api";r=499;t=300')
        self.send_header("RateLimit-Policy", '"fixed window";"api";q=500;w=300')
        self.send_header("X-Request-Id", "Root=1-stand-in")

    def simple(self, status, body=b"", headers=(), ctype="text/plain; charset=utf-8"):
        if isinstance(body, (dict, list)):
            body, ctype = json.dumps(body).encode(), "application/json; charset=utf-8"
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not self.is_cdn:
            self.hub_headers()
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self._entry is not None:
            self._entry["status"] = status
        self.finish_entry()

    def error(self, status, code=None, message="", extra=()):
        h = list(extra)
        if code:
            h.append(("X-Error-Code", code))
        if message:
            h.append(("X-Error-Message", message))
        body = {"error": message} if self.path.startswith("/api/") else message
        self.simple(status, body, h)

    # ---------- dispatch ----------
    def do_HEAD(self):
        self.dispatch()

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def dispatch(self):
        self._entry = None
        try:
            u = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(u.path)
            query = urllib.parse.parse_qs(u.query)
            if path.startswith("/_control/") and not self.is_cdn:
                return self.control(path, query)
            if self.is_cdn:
                scope = "cdn"
            elif path.startswith("/cdn/"):
                scope = "cdn"
            elif "/resolve/" in path or path.startswith("/api/resolve-cache/"):
                scope = "resolve"
            else:
                scope = "api"
            self.start_entry(scope)
            f = self.st.take("fail", scope, self.command, self.path)
            if f:
                self._entry["note"] = f"fail {f['status']}"
                h = []
                if f["status"] == 429:
                    ra = str(f.get("retry_after", 1))
                    h = [("Retry-After", ra), ("RateLimit", f'"resolvers";r=0;t={ra}')]
                return self.simple(f["status"], "injected failure", h)
            if self.is_cdn or path.startswith("/cdn/"):
                return self.cdn(path, query)
            if self.auth_class() == "invalid":
                return self.error(401, None, "Invalid credentials in Authorization header")
            if path == "/api/whoami-v2":
                if self.auth_class() == "none":
                    return self.error(401, None, "Invalid credentials in Authorization header")
                return self.simple(200, {"type": "user", "name": "stand-in-user", "auth": {"type": "access_token"}})
            if path == "/api/agent-harnesses":
                return self.simple(200, [])
            m = re.match(r"^/api/resolve-cache/(models|datasets|spaces)/([^/]+(?:/[^/]+)?)/([0-9a-f]{40})/(.+)$", path)
            if m:
                return self.resolve(m.group(1)[:-1], m.group(2), m.group(3), m.group(4), cached=True)
            m = re.match(r"^/api/(models|datasets|spaces)/(.+)$", path)
            if m:
                return self.api(m.group(1), m.group(2), query)
            m = re.match(r"^/(datasets/|spaces/)?([^/]+(?:/[^/]+)?)/resolve/([^/]+)/(.+)$", path)
            if m:
                kind = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1), "model")
                return self.resolve(kind, m.group(2), m.group(3), m.group(4))
            return self.error(404, None, "Not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.finish_entry()

    def control(self, path, query):
        if path == "/_control/faults" and self.command == "POST":
            n = int(self.headers.get("Content-Length", 0))
            self.st.set_faults(json.loads(self.rfile.read(n) or b"{}"))
            return self.raw_json({"ok": True})
        if path == "/_control/reset":
            self.st.reset()
            return self.raw_json({"ok": True})
        if path == "/_control/stats":
            since = int(query.get("since", ["0"])[0])
            with self.st.lock:
                body = {"served": dict(self.st.served), "log": self.st.log[since:], "faults": self.st.faults}
            return self.raw_json(body)
        if path == "/_control/repos":
            return self.raw_json({r.id: {"commit": r.commit, "files": {p: {k: v for k, v in e.items() if k != "full"}
                                                                          for p, e in r.files.items()}}
                                  for r in self.st.repos.values()})
        self.send_error(404)

    def raw_json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # ---------- repos and auth ----------
    def find_repo(self, kind, rid):
        """(repo, None) or (None, error already sent)."""
        if rid in self.st.renamed and self.command in ("GET", "HEAD"):
            new = self.st.renamed[rid]
            loc = self.path.replace(f"/{rid}/", f"/{new}/", 1)
            self.simple(307, f"Moved to {loc}", [("Location", loc)])
            return None, True
        repo = self.st.repos.get((kind, rid))
        auth = self.auth_class()
        if repo is None or (repo.private and auth != "valid"):
            status = 404 if auth in ("valid", "no-access") else 401
            self.error(status, "RepoNotFound", "Repository not found")
            return None, True
        if repo.gated and auth != "valid":
            if auth == "none":
                self.error(401, "GatedRepo", f"Access to model {rid} is restricted. You must have access to it and be authenticated to access it. Please log in.")
            else:
                self.error(403, "GatedRepo", f"Access to model {rid} is restricted and you are not in the authorized list. Visit https://huggingface.co/{rid} to ask for access.")
            return None, True
        return repo, None

    def rev_ok(self, repo, rev):
        return rev in ("main", repo.commit) or rev in getattr(repo, "tags", ())

    def advertised(self, e):
        """(size, sha256) as listed, with lies applied."""
        size = e["size"] + int(self.st.faults["lie_size"].get(e["path"], 0))
        sha = e["sha256"]
        if e["path"] in self.st.faults["lie_sha"]:
            sha = hashlib.sha256(sha.encode()).hexdigest()
        return size, sha

    def tree_entry(self, e):
        size, sha = self.advertised(e)
        d = {"type": "file", "oid": e["oid"], "size": size, "path": e["path"]}
        if e["lfs"]:
            d["lfs"] = {"oid": sha, "size": size, "pointerSize": 134}
            if self.st.faults["xet"]:
                d["xetHash"] = hashlib.sha256(e["sha256"].encode()).hexdigest()
        return d

    def api(self, plural, rest, query):
        kind = plural[:-1]
        m = re.match(r"^([^/]+(?:/[^/]+)?)/(revision|tree|paths-info|xet-read-token)/([^/]+)(?:/(.*))?$", rest)
        if rest == "whoami-v2" or (plural == "models" and rest in ("whoami-v2",)):
            pass
        if m is None:
            if "/" in rest and rest.count("/") <= 1:
                repo, err = self.find_repo_public(kind, rest)
                if err:
                    return
                return self.simple(200, self.info(repo, query))
            return self.error(404, None, "Not found")
        rid, op, rev, sub = m.groups()
        repo, err = self.find_repo(kind, rid)
        if err:
            return
        if not self.rev_ok(repo, rev):
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if op == "revision":
            return self.simple(200, self.info(repo, query))
        if op == "tree":
            return self.tree(repo, rev, sub, query)
        if op == "xet-read-token":
            return self.error(501, None, "no CAS in the stand-in")
        n = int(self.headers.get("Content-Length", 0))
        form = urllib.parse.parse_qs(self.rfile.read(n).decode())
        out = [self.tree_entry(repo.files[p]) for p in form.get("paths", []) if p in repo.files]
        return self.simple(200, out)

    def find_repo_public(self, kind, rid):
        repo = self.st.repos.get((kind, rid))
        if repo is None or (repo.private and self.auth_class() != "valid"):
            self.error(404 if self.auth_class() == "valid" else 401, "RepoNotFound", "Repository not found")
            return None, True
        return repo, None

    def info(self, repo, query):
        blobs = query.get("blobs", ["false"])[0] == "true"
        sib = []
        for p, e in sorted(repo.files.items()):
            s = {"rfilename": p}
            if blobs:
                size, sha = self.advertised(e)
                s.update(size=size, blobId=e["oid"])
                if e["lfs"]:
                    s["lfs"] = {"sha256": sha, "size": size, "pointerSize": 134}
            sib.append(s)
        return {"_id": repo.commit[:24], "id": repo.id, "sha": repo.commit, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "siblings": sib,
                "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0}

    def tree(self, repo, rev, sub, query):
        recursive = query.get("recursive", ["false"])[0] == "true"
        prefix = (sub.strip("/") + "/") if sub else ""
        if sub and sub.strip("/") not in repo.dirs:
            return self.error(404, "EntryNotFound", f"Entry not found: {sub}")
        entries = []
        for d in repo.dirs:
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        for p, e in sorted(repo.files.items()):
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):]):
                entries.append(self.tree_entry(e))
        for p in self.st.faults["evil_paths"]:
            entries.append({"type": "file", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 5, "path": p})
        entries.sort(key=lambda x: x["path"])
        start = int(query.get("cursor", ["0"])[0] or 0)
        page = entries[start:start + self.st.page_size]
        headers = []
        if start + self.st.page_size < len(entries):
            q = dict((k, v[0]) for k, v in query.items())
            q["cursor"] = str(start + self.st.page_size)
            nxt = f"http://127.0.0.1:{self.st.hub_port}{urllib.parse.urlsplit(self.path).path}?{urllib.parse.urlencode(q)}"
            headers.append(("Link", f'<{nxt}>; rel="next"'))
        return self.simple(200, page, headers)

    # ---------- resolve ----------
    def resolve(self, kind, rid, rev, fpath, cached=False):
        repo, err = self.find_repo(kind, rid)
        if err:
            return
        rev = urllib.parse.unquote(rev)
        if not self.rev_ok(repo, rev):
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        e = repo.files.get(fpath)
        if e is None:
            return self.error(404, "EntryNotFound", "Entry not found", [("X-Repo-Commit", repo.commit)])
        size, sha = self.advertised(e)
        if e["lfs"]:
            xet = []
            if self.st.faults["xet"]:
                xh = hashlib.sha256(e["sha256"].encode()).hexdigest()
                xet = [("X-Xet-Hash", xh),
                       ("Link", f'<http://127.0.0.1:{self.st.hub_port}/api/{kind}s/{rid}/xet-read-token/{repo.commit}>; '
                                f'rel="xet-auth", <http://127.0.0.1:{self.st.hub_port}/cas/v1/reconstructions/{xh}>; '
                                f'rel="xet-reconstruction-info"')]
            if self.st.faults["mirror_cdn"]:
                loc = f"/cdn/{repo.commit}/{sha}?name={urllib.parse.quote(fpath)}&k={e['sha256']}"
            else:
                expires = int(time.time()) + self.st.cdn_lifetime
                cpath = f"/repos/{sha[:2]}/{sha[2:4]}/{hashlib.sha1(repo.id.encode()).hexdigest()}/{e['sha256']}"
                disp = f"inline; filename*=UTF-8''{urllib.parse.quote(fpath.split('/')[-1])};"
                q = urllib.parse.urlencode({"response-content-disposition": disp, "Expires": expires,
                                            "Signature": sign(cpath, expires), "Key-Pair-Id": "K-STAND-IN"})
                loc = f"http://127.0.0.1:{self.st.cdn_port}{cpath}?{q}"
            body = f"Found. Redirecting to {loc}"
            return self.simple(302, body, [("Location", loc), ("X-Repo-Commit", repo.commit),
                                           ("X-Linked-Etag", f'"{sha}"'), ("X-Linked-Size", str(size)),
                                           ("ETag", f'W/"{hashlib.md5(body.encode()).hexdigest()}"'),
                                           ("Accept-Ranges", "bytes")] + xet)
        etag = f'"{e["blob"]}"'
        if self.st.faults["resolve_cache"] and not cached:
            plural = kind + "s"
            orig = urllib.parse.quote(f"/{rid}/resolve/{rev}/{fpath}", safe="")
            loc = (f"/api/resolve-cache/{plural}/{rid}/{repo.commit}/{urllib.parse.quote(fpath)}"
                   f"?{orig}=&etag={urllib.parse.quote(etag)}")
            return self.simple(307, f"Temporary Redirect. Redirecting to {loc}", [("Location", loc)])
        if self.headers.get("If-None-Match") == etag:
            return self.simple(304, b"", [("ETag", etag), ("X-Repo-Commit", repo.commit)])
        headers = [("X-Repo-Commit", repo.commit), ("ETag", etag),
                   ("Content-Disposition", f"inline; filename*=UTF-8''{urllib.parse.quote(fpath.split('/')[-1])}")]
        if (self.st.faults["gzip"] and self.command == "GET" and not self.headers.get("Range")
                and "gzip" in (self.headers.get("Accept-Encoding") or "")):
            return self.send_gzip(e, headers)
        return self.send_file(e, headers, advertised_size=size)

    def send_gzip(self, e, headers):
        """A small text file gzip-compressed with chunked encoding, as the Hub sends it to clients that accept it."""
        import gzip
        with open(e["full"], "rb") as f:
            body = gzip.compress(f.read())
        self.send_response(200)
        for k, v in headers:
            self.send_header(k, v)
        self.hub_headers()
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(body), 4096):
            part = body[i:i + 4096]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")
        self._entry.update(status=200, file=e["path"], bytes=len(body), note="gzip")
        self.finish_entry()

    def cdn(self, path, query):
        if self.st.cdn_rejects_auth and self.headers.get("Authorization") and not path.startswith("/cdn/"):
            self._entry["note"] = "auth at cdn"
            return self.simple(400, "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>")
        if path.startswith("/cdn/"):
            key = query.get("k", [""])[0]
        else:
            try:
                expires = int(query.get("Expires", ["0"])[0])
            except ValueError:
                expires = 0
            if not hmac.compare_digest(query.get("Signature", [""])[0], sign(path, expires)):
                return self.simple(403, "<Error><Code>AccessDenied</Code></Error>")
            if expires < time.time():
                return self.simple(403, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
            key = path.rsplit("/", 1)[-1]
        for repo in self.st.repos.values():
            for e in repo.files.values():
                if e["sha256"] == key:
                    headers = [("ETag", f'"{e["sha256"][:32]}-1"'), ("X-Amz-Cf-Id", "stand-in")]
                    disp = query.get("response-content-disposition")
                    if disp:
                        headers.append(("Content-Disposition", disp[0]))
                    if path.startswith("/cdn/"):
                        headers += [("X-Repo-Commit", repo.commit), ("X-Linked-Etag", f'"{e["sha256"]}"')]
                    return self.send_file(e, headers)
        return self.simple(404, "<Error><Code>NoSuchKey</Code></Error>")

    # ---------- bodies ----------
    def send_file(self, e, headers, advertised_size=None):
        size = e["size"]
        rng = self.headers.get("Range")
        start, end, status = 0, size - 1, 200
        if rng and not self.st.faults["ignore_range"]:
            m = re.match(r"^bytes=(\d*)-(\d*)$", rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start, end = max(0, size - int(m.group(2))), size - 1
                if start >= size or start > end:
                    return self.simple(416, "", [("Content-Range", f"bytes */{size}")] + headers)
                status = 206
        elif rng:
            self._entry["note"] = "range ignored"
        length = end - start + 1 if size else 0
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not self.is_cdn:
            self.hub_headers()
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        cl = length if (self.command != "HEAD" or advertised_size is None) else advertised_size
        self.send_header("Content-Length", str(cl))
        self.end_headers()
        self._entry["status"] = status
        self._entry["file"] = e["path"]
        if self.command == "HEAD" or length == 0:
            return self.finish_entry()
        self.wfile.flush()
        scope = self._entry["scope"]
        drop = self.st.take("drop", scope, self.command, self.path, body_len=length)
        stall = self.st.take("stall", scope, self.command, self.path, body_len=length)
        bw = int(self.st.faults["bandwidth"] or 0)
        limit = length
        if drop:
            limit = min(limit, drop.get("after", 0))
            self._entry["note"] = "drop"
        sent = 0
        try:
            with open(e["full"], "rb") as f:
                if not (drop or stall or bw):
                    sent = self.sendfile_all(f, start, length)
                else:
                    t0 = time.monotonic()
                    chunk = 64 << 10 if not bw else max(1024, min(64 << 10, bw // 20))
                    while sent < limit:
                        if stall and sent >= stall.get("after", 0):
                            self._entry["note"] = "stall"
                            time.sleep(stall.get("seconds", 5))
                            stall = None
                        n = min(chunk, limit - sent)
                        if stall:
                            n = min(n, max(1, stall.get("after", 0) - sent))
                        f.seek(start + sent)
                        b = f.read(n)
                        self.wfile.write(b)
                        sent += len(b)
                        if bw:
                            ahead = sent / bw - (time.monotonic() - t0)
                            if ahead > 0:
                                time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self._entry["bytes"] = sent
            self.finish_entry()
        if drop:
            self.close_connection = True
            if drop.get("rst"):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            try:
                self.wfile.flush()
            except OSError:
                pass
            self.connection.close()

    def sendfile_all(self, f, offset, count):
        sock = self.connection
        sent = 0
        while sent < count:
            n = os.sendfile(sock.fileno(), f.fileno(), offset + sent, count - sent)
            if n == 0:
                break
            sent += n
        return sent


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR", help="serve DIR as a model repo")
    ap.add_argument("--dataset", action="append", default=[], metavar="ORG/NAME=DIR", help="serve DIR as a dataset repo")
    ap.add_argument("--gated", action="append", default=[], metavar="ORG/NAME")
    ap.add_argument("--private", action="append", default=[], metavar="ORG/NAME")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="OLD answers a relative 307 to NEW")
    ap.add_argument("--token", action="append", help="a valid token with access to every repo")
    ap.add_argument("--token-no-access", action="append", help="a valid token without access to private/gated repos")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--page-size", type=int, default=1000)
    ap.add_argument("--lfs-threshold", type=int, default=10 << 20)
    ap.add_argument("--mirror-cdn", action="store_true", help="LFS redirects stay on the Hub origin (/cdn/...)")
    ap.add_argument("--cdn-lifetime", type=int, default=3600, help="seconds a signed CDN URL is valid")
    ap.add_argument("--cdn-allows-auth", action="store_true")
    ap.add_argument("--hash-cache", help="JSON file caching file hashes between runs")
    ap.add_argument("--log", help="also append the request log to this JSON-lines file")
    ap.add_argument("--faults", help="initial faults, JSON (see the module doc)")
    ap.add_argument("--bandwidth", type=int, default=0, help="bytes/s per connection for file bodies")
    ap.add_argument("--ignore-range", action="store_true")
    a = ap.parse_args(argv)
    state = State(a)
    for kind, specs in (("model", a.repo), ("dataset", a.dataset)):
        for spec in specs:
            rid, _, d = spec.partition("=")
            state.repos[(kind, rid)] = Repo(rid, d, kind, a.lfs_threshold, a.hash_cache)
    for rid in a.gated:
        for (k, r), repo in state.repos.items():
            if r == rid:
                repo.gated = True
    for rid in a.private:
        for (k, r), repo in state.repos.items():
            if r == rid:
                repo.private = True
    for spec in a.rename:
        old, _, new = spec.partition("=")
        state.renamed[old] = new
    faults = json.loads(a.faults) if a.faults else {}
    if a.bandwidth:
        faults["bandwidth"] = a.bandwidth
    if a.ignore_range:
        faults["ignore_range"] = True
    state.set_faults(faults)

    hub_cls = type("HubHandler", (Handler,), {"is_cdn": False})
    cdn_cls = type("CdnHandler", (Handler,), {"is_cdn": True})
    hub = Server(("127.0.0.1", a.port), hub_cls)
    cdn = Server(("127.0.0.1", 0), cdn_cls)
    hub.state = cdn.state = state
    state.hub_port, state.cdn_port = hub.server_address[1], cdn.server_address[1]
    threading.Thread(target=cdn.serve_forever, daemon=True).start()
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(state.hub_port))
        os.replace(tmp, a.port_file)
    print(f"stand-in hub on http://127.0.0.1:{state.hub_port} (cdn :{state.cdn_port})", flush=True)
    for (k, r), repo in sorted(state.repos.items()):
        print(f"  {k} {r} @ {repo.commit} ({len(repo.files)} files)", flush=True)
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
