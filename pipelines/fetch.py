"""Get the Video-R1 dataset: from the Hugging Face Hub (resumable) or from a local mirror directory.

Hub: `huggingface_hub.snapshot_download` into a plain directory (``local_dir``), limited to ``data.include``
patterns. The branch/tag is first resolved to a commit sha, and that sha is downloaded, so the recorded revision is
exactly what is on disk. Interrupted downloads resume (huggingface_hub keeps partial files under
``<out>/.cache/huggingface``). ``HF_ENDPOINT`` points it at a mirror (tests use a local `olah` server).

Mirror (``--source DIR``): the same include patterns (same matching as the Hub's ``allow_patterns``) select files
from a local copy; each is hard-linked when source and output share a filesystem, else copied (temp file + rename,
mtime kept). A file already present with the same size and mtime (or the same inode) is skipped, so a second run
is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pipelines.errors import VideoR1Error


class FetchError(VideoR1Error):
    """The dataset could not be fetched (repo or revision not found, hub unreachable, bad mirror)."""


@dataclass
class FetchResult:
    out: Path
    repo_id: str
    revision: Optional[str]  # commit sha from the hub; the requested revision (or None) from a mirror
    include: list[str]
    source: Optional[str] = None
    files: list[str] = field(default_factory=list)
    linked: int = 0
    copied: int = 0
    skipped: int = 0
    bytes: int = 0

    def meta(self) -> dict:
        m = {"repo_id": self.repo_id, "revision": self.revision, "include": self.include}
        if self.source:
            m["source"] = self.source
        return m

    def manifest(self) -> str:
        """sha256 over (relative path, size) of the fetched files: identifies the selection without reading it
        (the directory may also hold hundreds of GB of extracted media that are not part of the fetch)."""
        h = hashlib.sha256()
        for rel in sorted(self.files):
            p = self.out / rel
            h.update(f"{rel}\0{p.stat().st_size if p.is_file() else -1}\n".encode())
        return "files:" + h.hexdigest()


def _select(paths: list[str], include: list[str]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(paths, allow_patterns=include or None))


def fetch_hub(repo_id: str, out: str | os.PathLike, *, revision: Optional[str] = None,
              include: Optional[list[str]] = None, max_workers: int = 8) -> FetchResult:
    """Download the dataset repo's files matching ``include`` into ``out``; resumes an interrupted download."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    include = list(include or [])
    out = Path(out)
    try:
        info = HfApi().dataset_info(repo_id, revision=revision or "main")
        sha = info.sha
        remote = [s.rfilename for s in (info.siblings or [])]
        snapshot_download(repo_id=repo_id, repo_type="dataset", revision=sha, allow_patterns=include or None,
                          local_dir=out, max_workers=max_workers)
    except RevisionNotFoundError:
        raise FetchError(f"dataset {repo_id} has no revision '{revision}'", hint="check data.revision") from None
    except RepositoryNotFoundError:
        raise FetchError(f"dataset repo '{repo_id}' not found (or private)",
                         hint="check data.repo_id; log in with `hf auth login` for a private repo") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise FetchError(f"cannot reach the hub for {repo_id}: {e}",
                         hint="unset HF_HUB_OFFLINE, set HF_ENDPOINT for a mirror, or use --source DIR") from None
    except HfHubHTTPError as e:
        raise FetchError(f"download of {repo_id} failed: {e}", hint="run again to resume") from None
    files = _select(remote, include)
    total = sum((out / f).stat().st_size for f in files if (out / f).is_file())
    return FetchResult(out=out, repo_id=repo_id, revision=sha, include=include, files=files, bytes=total)


def _same(src: Path, dst: Path) -> bool:
    try:
        a, b = src.stat(), dst.stat()
    except FileNotFoundError:
        return False
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def fetch_mirror(source: str | os.PathLike, out: str | os.PathLike, *, repo_id: str, revision: Optional[str] = None,
                 include: Optional[list[str]] = None,
                 progress: Optional[Callable[[str], None]] = None) -> FetchResult:
    """Link or copy the files of a local mirror matching ``include`` into ``out`` (skips identical files)."""
    src_root = Path(source)
    if not src_root.is_dir():
        raise FetchError(f"mirror directory not found: {source}", hint="--source must be a directory")
    out = Path(out)
    if out.resolve() == src_root.resolve():
        raise FetchError("--out is the --source directory", hint="choose another --out")
    include = list(include or [])
    rels = []
    for dirpath, dirnames, filenames in os.walk(src_root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".cache"))
        for name in filenames:
            rels.append((Path(dirpath) / name).relative_to(src_root).as_posix())
    files = sorted(_select(rels, include))
    res = FetchResult(out=out, repo_id=repo_id, revision=revision, include=include, source=str(src_root.resolve()),
                      files=files)
    for rel in files:
        src, dst = src_root / rel, out / rel
        res.bytes += src.stat().st_size
        if _same(src, dst):
            res.skipped += 1
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
            os.close(fd)
            os.unlink(tmp)
            try:
                try:
                    os.link(src, tmp)
                    res.linked += 1
                except OSError:  # another filesystem (EXDEV), or links not permitted
                    shutil.copy2(src, tmp)
                    res.copied += 1
                os.replace(tmp, dst)
            except BaseException:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                raise
        if progress:
            progress(rel)
    return res
