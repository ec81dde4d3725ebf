#!/usr/bin/env python3
"""Build a corpus of real English text from the documentation installed on this machine.

    python3 scripts/make-corpus.py OUT --mb N [--format jsonl,txt,csv,parquet] [--meta]
                                   [--sources LIST] [--order interleave|sequential] [--shuffle SEED]

Sources (each used only if present; nothing is downloaded, nothing is imported from the scanned code):
  python-topics      the Python language reference topics that `pydoc` shows (`pydoc_data.topics`), one document
                     per topic: ships with CPython itself.
  python-docstrings  docstrings of the running interpreter's standard library, read with `ast` (never imported),
                     one document per module (module, class and function docstrings); test packages are skipped.
  debian-docs        /usr/share/doc/**: README*, NEWS*, FAQ*, TODO*, *.txt, *.md, *.rst and their .gz (the files
                     Debian packages install; copyright files and changelogs are skipped).
  man-pages          English manual pages /usr/share/man/man[1-8] of at least 2 KB on disk, rendered to text with
                     groff (groff-base), in section then file-name order, only as many as needed.
  python-packages    (not in the default list) docstrings of the running interpreter's site-packages, i.e. the
                     packages pinned by scripts/setup-python.sh when run with .venv/current/bin/python; slow to
                     parse (about 3 s per MB) but large (about 33 MB).

Processing: text is split into paragraphs (blank lines); paragraphs that are mostly not letters (tables, code,
rulers) are dropped; every paragraph is kept once (de-duplicated over the whole corpus); a source file longer than
64,000 characters is split into several documents at paragraph boundaries. Documents are taken from the sources
in turn (--order interleave, the default) or source after source (--order sequential), files in sorted path
order, and optionally shuffled (--shuffle SEED). Documents are added until the text reaches N MB (10^6 bytes of
UTF-8 text, not counting JSON/CSV overhead); if the sources run out, they are repeated with a suffix naming the
copy and the document index, so every document stays unique. Same machine, same arguments: same bytes.

Formats (--format, comma-separated; default from OUT's extension, else jsonl):
  jsonl    one JSON object per line: {"text": ...} ({"id", "title", "text"} with --meta, like wikicorpus)
  txt      the documents' text, separated by one blank line (datasets' "text" loader makes one row per line)
  csv      header row, then one record per document (RFC 4180 quoting, "\\n" line ends)
  parquet  one row per document, string columns (needs pyarrow)
With several formats, OUT's extension is replaced by each format's (OUT.jsonl, OUT.txt, ...).
"""

import argparse
import ast
import csv
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

MAX_DOC_CHARS = 64_000
MIN_PARA_CHARS = 40
ALL_SOURCES = ["python-topics", "python-docstrings", "debian-docs", "man-pages"]
FORMATS = ["jsonl", "txt", "csv", "parquet"]
EXT = {"jsonl": ".jsonl", "txt": ".txt", "csv": ".csv", "parquet": ".parquet"}

DOC_ROOT = "/usr/share/doc"
MAN_ROOT = "/usr/share/man"
DOC_NAME_RE = re.compile(r"^(readme|news|faq|todo|history|bugs|usage|install)([._-].*)?$",
                         re.IGNORECASE)
DOC_EXT_RE = re.compile(r"\.(txt|md|rst|markdown)$", re.IGNORECASE)
DOC_SKIP_RE = re.compile(r"^(copyright|changelog.*|.*\.debian)$", re.IGNORECASE)
MAX_DOC_FILE_BYTES = 8_000_000
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload",
                    "_bundled", "pydoc_data"}
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
MAN_MIN_BYTES = 2000  # smaller pages are mostly synopsis; skipping them keeps groff runs few and prose-rich


def log(msg):
    print(f"make-corpus: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Text clean-up


def clean_text(text):
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    # Characters that some line splitters (Python's str.splitlines) treat as line ends.
    text = text.replace("\u2028", "\n").replace("\u2029", "\n\n").replace("\x85", "\n")
    text = CONTROL_RE.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n"))


def paragraphs(text):
    """Paragraphs (blank-line separated), each dedented, without leading/trailing blank lines."""
    for block in re.split(r"\n\s*\n", text):
        lines = [l for l in block.split("\n") if l.strip()]
        if not lines:
            continue
        indent = min(len(l) - len(l.lstrip(" ")) for l in lines)
        yield "\n".join(l[indent:] for l in lines)


def looks_like_prose(p):
    if len(p) < MIN_PARA_CHARS:
        return False
    visible = [c for c in p if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if letters < 0.6 * len(visible):
        return False
    words = re.findall(r"[A-Za-z]{2,}", p)
    if len(words) < 6:
        return False
    # Mostly interactive-session or code lines?
    lines = p.split("\n")
    codeish = sum(l.lstrip().startswith((">>>", "...", "$ ", "# ", "#include", "{", "}")) for l in lines)
    return codeish * 2 <= len(lines)


class Deduper:
    def __init__(self):
        self.seen = set()

    def fresh(self, p):
        key = hashlib.blake2b(" ".join(p.split()).encode("utf-8"), digest_size=16).digest()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def to_documents(title, raw, dedup):
    """Clean `raw`, keep fresh prose paragraphs, yield (title, text) documents of <= MAX_DOC_CHARS."""
    kept = [p for p in paragraphs(clean_text(raw)) if looks_like_prose(p) and dedup.fresh(p)]
    part, size, n = [], 0, 0
    for p in kept:
        if len(p) > MAX_DOC_CHARS:  # a monster paragraph: cut at line boundaries
            p = p[:MAX_DOC_CHARS].rsplit("\n", 1)[0]
        if part and size + 2 + len(p) > MAX_DOC_CHARS:
            n += 1
            yield (f"{title} (part {n})", "\n\n".join(part))
            part, size = [], 0
        part.append(p)
        size += len(p) + 2
    if part:
        yield (f"{title} (part {n + 1})" if n else title, "\n\n".join(part))


def read_maybe_gz(path, limit=MAX_DOC_FILE_BYTES):
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if path.endswith(".gz"):
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
                data = g.read(limit + 1)
        except (OSError, EOFError):
            return None
    if len(data) > limit or b"\x00" in data[:8192]:
        return None
    text = data.decode("utf-8", errors="replace")
    if text.count("\ufffd") > len(text) // 100:
        return None
    return text


# ---------------------------------------------------------------------------------------------------------------
# Sources: each is a generator of (title, raw text) in a deterministic order


def src_python_topics():
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield f"Python reference: {name}", topics[name]


def py_files(root, skip_dirs):
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith("config-")
                         and not d.endswith((".dist-info", ".egg-info", ".data")))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test_"):
                yield os.path.join(dirpath, f)


def module_docstrings(root, skip_dirs, label):
    for path in py_files(root, skip_dirs):
        try:
            with open(path, "rb") as fh:
                tree = ast.parse(fh.read(), filename=path)
        except (SyntaxError, ValueError, OSError, RecursionError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node, clean=True)
                if d:
                    docs.append(d)
        if docs:
            mod = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            yield f"{label} {mod}", "\n\n".join(docs)


def src_python_docstrings():
    yield from module_docstrings(sysconfig.get_paths()["stdlib"], STDLIB_SKIP_DIRS, "Python module")


def src_python_packages():
    purelib = sysconfig.get_paths()["purelib"]
    if os.path.isdir(purelib):
        yield from module_docstrings(purelib, {"test", "tests", "testing", "__pycache__", "_vendor", "vendored"},
                                     "Python package module")


def src_debian_docs():
    if not os.path.isdir(DOC_ROOT):
        return
    for root, dirs, files in os.walk(DOC_ROOT):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            base = f[:-3] if f.endswith(".gz") else f
            if DOC_SKIP_RE.match(base) or os.path.islink(path):
                continue
            if not (DOC_NAME_RE.match(base) or DOC_EXT_RE.search(base)):
                continue
            text = read_maybe_gz(path)
            if text:
                yield f"{os.path.relpath(path, DOC_ROOT)}", text


def man_pages():
    if not os.path.isdir(MAN_ROOT):
        return
    for sec in range(1, 9):
        d = os.path.join(MAN_ROOT, f"man{sec}")
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            path = os.path.join(d, f)
            if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) < MAN_MIN_BYTES:
                continue
            yield path


MAN_SPACES_RE = re.compile(r"(?<=\S) {2,}(?=\S)")


def render_man(path):
    """Render one man page to plain text with groff; None for aliases (.so) and failures."""
    src = read_maybe_gz(path, limit=2_000_000)
    if not src or src.lstrip().startswith(".so "):
        return None
    env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
    env.pop("MANWIDTH", None)
    try:
        r = subprocess.run(
            ["groff", "-mandoc", "-Tutf8", "-P-cbou", "-rLL=100n", "-rHY=0", "-t", "-k"],
            input=src.encode("utf-8"), capture_output=True, timeout=30, env=env,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout:
        return None
    lines = r.stdout.decode("utf-8", errors="replace").split("\n")
    body = [l for l in lines if l.strip()]
    if len(body) < 3:
        return None
    header, footer = body[0], body[-1]
    out = []
    for l in lines:
        if l in (header, footer):
            continue
        l = l[min(7, len(l) - len(l.lstrip(" "))):]  # man's standard 7-column body indent
        out.append(MAN_SPACES_RE.sub(" ", l))  # undo justification
    return "\n".join(out)


def src_man_pages(workers=2):
    if shutil.which("groff") is None:
        log("man-pages: groff not found, source skipped")
        return
    name_re = re.compile(r"^(.*)\.(\d\w*?)(\.gz)?$")
    paths = man_pages()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        pending = deque()
        while True:
            while len(pending) < 4 * workers:  # bounded look-ahead keeps the work lazy and the order fixed
                p = next(paths, None)
                if p is None:
                    break
                pending.append((p, ex.submit(render_man, p)))
            if not pending:
                return
            p, fut = pending.popleft()
            text = fut.result()
            if text:
                m = name_re.match(os.path.basename(p))
                title = f"man {m.group(1)}({m.group(2)})" if m else f"man {os.path.basename(p)}"
                yield title, text


SOURCES = {
    "python-topics": src_python_topics,
    "python-docstrings": src_python_docstrings,
    "debian-docs": src_debian_docs,
    "man-pages": src_man_pages,
    "python-packages": src_python_packages,
}


# ---------------------------------------------------------------------------------------------------------------
# Assembly


def documents(sources, order, dedup):
    """Yield (source, title, text) documents, sources interleaved one document at a time or one after another."""
    gens = [(s, (d for title, raw in SOURCES[s]() for d in to_documents(title, raw, dedup))) for s in sources]
    if order == "sequential":
        for s, g in gens:
            for title, text in g:
                yield s, title, text
        return
    active = deque(gens)
    while active:
        s, g = active.popleft()
        d = next(g, None)
        if d is None:
            continue
        yield s, d[0], d[1]
        active.append((s, g))


def build(target_bytes, sources, order, shuffle_seed):
    dedup = Deduper()
    picked, total = [], 0
    for s, title, text in documents(sources, order, dedup):
        picked.append((s, title, text))
        total += len(text.encode("utf-8"))
        if total >= target_bytes:
            break
    if not picked:
        raise SystemExit("make-corpus: error: no usable text found in the selected sources")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(picked)
    docs = list(picked)
    copy = 1
    while total < target_bytes:  # sources exhausted: repeat them, each copy made unique by a suffix
        copy += 1
        for i, (s, title, text) in enumerate(picked):
            suffix = f"\n\n(Copy {copy} of document {i + 1}.)"
            docs.append((s, f"{title} [copy {copy}]", text + suffix))
            total += len(text.encode("utf-8")) + len(suffix.encode("utf-8"))
            if total >= target_bytes:
                break
    return docs, total, copy


def write_atomic(path, writer):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rows(docs, meta):
    for i, (_, title, text) in enumerate(docs):
        yield ({"id": str(i), "title": title, "text": text} if meta else {"text": text})


def write_jsonl(path, docs, meta):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows(docs, meta):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_txt(path, docs, meta):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, (_, _, text) in enumerate(docs):
            if i:
                f.write("\n")
            f.write(text + "\n")


def write_csv(path, docs, meta):
    cols = ["id", "title", "text"] if meta else ["text"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows(docs, meta):
            w.writerow(r)


def write_parquet(path, docs, meta):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("make-corpus: error: --format parquet needs pyarrow (use .venv/current/bin/python)")
    cols = {"text": [t for _, _, t in docs]}
    if meta:
        cols = {"id": [str(i) for i in range(len(docs))], "title": [t for _, t, _ in docs], **cols}
    table = pa.table({k: pa.array(v, type=pa.string()) for k, v in cols.items()})
    pq.write_table(table, path)


WRITERS = {"jsonl": write_jsonl, "txt": write_txt, "csv": write_csv, "parquet": write_parquet}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", help="output file (its extension picks the format unless --format is given)")
    ap.add_argument("--mb", type=float, required=True, help="text size to reach, in MB (10^6 bytes of UTF-8 text)")
    ap.add_argument("--format", default=None, help=f"comma-separated subset of {','.join(FORMATS)}")
    ap.add_argument("--meta", action="store_true", help="also write id and title columns (wikicorpus-like)")
    ap.add_argument("--sources", default=",".join(ALL_SOURCES), help=f"comma-separated, in order; default {','.join(ALL_SOURCES)}; also: python-packages")
    ap.add_argument("--order", choices=["interleave", "sequential"], default="interleave")
    ap.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="shuffle the documents with this seed")
    args = ap.parse_args(argv)

    if args.mb <= 0:
        ap.error("--mb must be positive")
    sources = [s for s in args.sources.split(",") if s]
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        ap.error(f"unknown source(s) {bad}; choose from {list(SOURCES)}")
    base, ext = os.path.splitext(args.out)
    if args.format:
        formats = [f for f in args.format.split(",") if f]
    else:
        formats = [next((f for f, e in EXT.items() if e == ext.lower()), "jsonl")]
        if ext.lower() == ".json":
            formats = ["jsonl"]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown format(s) {bad}; choose from {FORMATS}")
    if len(formats) == 1:
        outputs = {formats[0]: args.out}
    else:
        stem = base if ext.lower() in EXT.values() or ext.lower() == ".json" else args.out
        outputs = {f: stem + EXT[f] for f in formats}

    t0 = time.time()
    docs, total, copies = build(int(args.mb * 1_000_000), sources, args.order, args.shuffle)
    for f, path in outputs.items():
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        write_atomic(path, lambda tmp, f=f: WRITERS[f](tmp, docs, args.meta))
    per_source = {}
    for s, _, _ in docs:
        per_source[s] = per_source.get(s, 0) + 1
    src_summary = ", ".join(f"{s} {per_source[s]}" for s in sources if s in per_source)
    files = ", ".join(f"{p} ({os.path.getsize(p) / 1e6:.2f} MB)" for p in outputs.values())
    rep = f", sources repeated up to copy {copies}" if copies > 1 else ""
    print(f"make-corpus: wrote {files}: {len(docs)} docs, {total / 1e6:.2f} MB text [{src_summary}]{rep} "
          f"({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
