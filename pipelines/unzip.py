"""Safe, idempotent, restartable extraction of every ``*.zip`` under a directory (Video-R1's ``src/unzip.py``).

Like Video-R1's script, each archive is extracted into its own directory (``CLEVRER/CLEVRER.zip`` -> ``CLEVRER/``),
which is what the record paths (``./CLEVRER/...``) expect. Unlike it:

- **Unsafe entries refuse the archive**: a name that escapes the target (``../``, an absolute path, a drive letter,
  a path through an existing symlink that points outside) or a symlink entry (Unix mode ``S_IFLNK`` in
  ``external_attr``) makes the archive an error before anything of it is written.
- **Idempotent**: after a complete extraction a marker ``.<name>.zip.extracted`` (JSON: size, mtime, a hash of the
  central directory entries, file and byte counts) is written next to the archive; a later run skips an archive whose
  marker matches, and re-extracts one that changed.
- **Restartable**: entries are extracted into a temporary directory inside the target (same filesystem), then
  renamed into place, and the marker is written last. A run killed mid-way leaves no marker; the next run removes the
  stale temporary directory and extracts again, replacing any files already moved.
- **Integrity**: zipfile checks each entry's CRC-32 as it is read, so a corrupt member fails the archive (BadZipFile)
  during extraction, without a separate ``testzip`` pass over hundreds of GB. A failed archive is reported by name,
  the others are still extracted, and the caller gets every result to summarise.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import posixpath
import re
import shutil
import stat
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

TMP_PREFIX = ".videor1-unzip-"
_BUF = 1 << 20


class UnsafeArchive(Exception):
    """An archive entry that would write outside its target, or a symlink entry."""


@dataclass
class ArchiveResult:
    archive: str
    status: str  # extracted | skipped | error
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def find_archives(root: str | os.PathLike) -> list[Path]:
    """Every ``*.zip`` (any case) under root, sorted; files inside our temporary directories are ignored."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(TMP_PREFIX))
        for name in sorted(filenames):
            if name.lower().endswith(".zip"):
                out.append(Path(dirpath) / name)
    return out


def marker_path(archive: Path) -> Path:
    return archive.parent / f".{archive.name}.extracted"


def fingerprint(archive: Path, zf: zipfile.ZipFile) -> dict:
    """What identifies an archive's content cheaply: size, mtime and a hash of its central directory entries."""
    st = archive.stat()
    h = hashlib.sha256()
    for info in zf.infolist():
        h.update(f"{info.filename}\0{info.CRC}\0{info.file_size}\0{info.compress_size}\0{info.header_offset}\n"
                 .encode("utf-8", "surrogateescape"))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "central_directory_sha256": h.hexdigest()}


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def check_entry(info: zipfile.ZipInfo, target: Path) -> str:
    """The safe relative name of an entry, or raise UnsafeArchive."""
    raw = info.filename
    name = raw.replace("\\", "/")
    if _is_symlink(info):
        raise UnsafeArchive(f"symlink entry {raw!r}")
    if "\0" in name:
        raise UnsafeArchive(f"entry name with NUL byte {raw!r}")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchive(f"absolute path entry {raw!r}")
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
        raise UnsafeArchive(f"entry {raw!r} escapes the target directory")
    if norm == ".":
        return ""
    dest = (target / norm).resolve()
    base = target.resolve()
    if dest != base and base not in dest.parents:
        raise UnsafeArchive(f"entry {raw!r} resolves outside the target directory ({dest})")
    return norm


def _move_into(src: Path, dst: Path) -> None:
    """Move a tree into place, merging with what exists (files are replaced: a partial earlier run is overwritten)."""
    if src.is_dir() and not src.is_symlink():
        if dst.exists() and not dst.is_dir():
            dst.unlink()
        dst.mkdir(exist_ok=True)
        for child in src.iterdir():
            _move_into(child, dst / child.name)
        src.rmdir()
    else:
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(src, dst)


def extract_archive(
    archive: str | os.PathLike,
    *,
    force: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> ArchiveResult:
    """Extract one archive into its own directory; never raises for a bad archive (the result says why)."""
    archive = Path(archive)
    target = archive.parent
    t0 = time.time()
    res = ArchiveResult(str(archive), "error")
    tmp: Optional[Path] = None
    try:
        with zipfile.ZipFile(archive) as zf:
            fp = fingerprint(archive, zf)
            marker = marker_path(archive)
            if not force and marker.exists():
                try:
                    old = json.loads(marker.read_text())
                except ValueError:
                    old = {}
                if all(old.get(k) == v for k, v in fp.items()):
                    res.status, res.files, res.bytes = "skipped", old.get("files", 0), old.get("bytes", 0)
                    return res
            infos = zf.infolist()
            names = [(info, check_entry(info, target)) for info in infos]  # refuse before writing anything
            # A stale temporary directory of this archive (a killed run) is removed before starting again.
            for stale in target.glob(f"{TMP_PREFIX}{archive.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = target / f"{TMP_PREFIX}{archive.name}-{os.getpid()}"
            tmp.mkdir()
            for info, name in names:
                if not name:
                    continue
                out = tmp / name
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    while True:
                        chunk = src.read(_BUF)
                        if not chunk:
                            break
                        dst.write(chunk)
                        if progress:
                            progress(len(chunk))
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(out, mode | 0o600)
                mtime = time.mktime(info.date_time + (0, 0, -1))
                os.utime(out, (mtime, mtime))
                res.files += 1
                res.bytes += info.file_size
            for child in list(tmp.iterdir()):
                _move_into(child, target / child.name)
            tmp.rmdir()
            tmp = None
            marker_tmp = marker.with_name(marker.name + ".tmp")
            marker_tmp.write_text(json.dumps({**fp, "files": res.files, "bytes": res.bytes,
                                              "extracted_at": time.time()}))
            os.replace(marker_tmp, marker)
            res.status = "extracted"
    except UnsafeArchive as e:
        res.error = f"unsafe archive, nothing extracted: {e}"
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError) as e:
        res.error = f"corrupt archive: {e}"
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        # RuntimeError also covers zipfile's errors for an encrypted member and (its subclass) for a compression
        # method it cannot read, e.g. Deflate64: an unreadable archive, reported like the others.
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        res.seconds = time.time() - t0
    return res


def archive_size(archive: Path) -> int:
    """Uncompressed bytes of an archive (0 when unreadable): the progress total."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return sum(i.file_size for i in zf.infolist() if not i.is_dir())
    except (zipfile.BadZipFile, OSError):
        return 0


def extract_all(
    root: str | os.PathLike,
    *,
    jobs: int = 1,
    force: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    on_result: Optional[Callable[[ArchiveResult], None]] = None,
) -> list[ArchiveResult]:
    """Extract every archive under root with `jobs` threads (zlib and file I/O release the GIL).

    Returns one result per archive, in path order. ``progress(n_bytes)`` is called as data is written and
    ``on_result(result)`` as each archive finishes.
    """
    archives = find_archives(root)
    results: dict[Path, ArchiveResult] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = {pool.submit(extract_archive, a, force=force, progress=progress): a for a in archives}
        for fut in as_completed(futs):
            r = fut.result()
            results[futs[fut]] = r
            if on_result:
                on_result(r)
    return [results[a] for a in archives]
