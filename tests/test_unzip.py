"""pipelines.unzip and `videor1 data unzip`: in-place extraction, zip-slip refusal, corrupt archives, idempotence."""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

from pipelines.registry import Registry
from pipelines.unzip import TMP_PREFIX, extract_all, extract_archive, find_archives, marker_path


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Run dirs (videor1-runs/ under the cwd) land in the test's tmp dir, not the repo."""
    monkeypatch.chdir(tmp_path)


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_symlink_zip(path: Path, link: str, target: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo(link)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return path


@pytest.fixture
def tree(tmp_path):
    """A Video-R1-data-like tree: CLEVRER/CLEVRER.zip and Chart/part1.zip + part2.zip."""
    root = tmp_path / "Video-R1-data"
    make_zip(root / "CLEVRER" / "CLEVRER.zip", {"videos/v0.mp4": b"\0" * 1000, "videos/v1.mp4": b"\1" * 500})
    make_zip(root / "Chart" / "part1.zip", {"chart/a.png": b"png-a"})
    make_zip(root / "Chart" / "part2.zip", {"chart/b.png": b"png-b", "chart/sub/": b""})
    (root / "Video-R1-260k.json").write_text("[]")
    return root


def test_extracts_in_place_and_is_idempotent(tree):
    results = extract_all(tree, jobs=2)
    assert [r.status for r in results] == ["extracted"] * 3
    assert (tree / "CLEVRER" / "videos" / "v0.mp4").read_bytes() == b"\0" * 1000
    assert (tree / "Chart" / "chart" / "a.png").read_bytes() == b"png-a"
    assert (tree / "Chart" / "chart" / "b.png").read_bytes() == b"png-b"
    assert (tree / "Chart" / "chart" / "sub").is_dir()
    marker = json.loads(marker_path(tree / "CLEVRER" / "CLEVRER.zip").read_text())
    assert marker["files"] == 2 and marker["bytes"] == 1500 and len(marker["central_directory_sha256"]) == 64
    assert not list(tree.rglob(f"{TMP_PREFIX}*"))
    # second run: nothing extracted again, even if a file was touched by hand
    (tree / "CLEVRER" / "videos" / "v0.mp4").write_bytes(b"edited")
    again = extract_all(tree, jobs=1)
    assert [r.status for r in again] == ["skipped"] * 3
    assert (tree / "CLEVRER" / "videos" / "v0.mp4").read_bytes() == b"edited"
    # a changed archive is extracted again
    make_zip(tree / "CLEVRER" / "CLEVRER.zip", {"videos/v0.mp4": b"new"})
    third = {Path(r.archive).name: r.status for r in extract_all(tree)}
    assert third == {"CLEVRER.zip": "extracted", "part1.zip": "skipped", "part2.zip": "skipped"}
    assert (tree / "CLEVRER" / "videos" / "v0.mp4").read_bytes() == b"new"


def test_restart_after_partial_extraction(tree):
    z = tree / "CLEVRER" / "CLEVRER.zip"
    # what a killed run leaves: a stale temp dir, a half-moved file, no marker
    stale = tree / "CLEVRER" / f"{TMP_PREFIX}CLEVRER.zip-99999"
    (stale / "videos").mkdir(parents=True)
    (stale / "videos" / "v1.mp4").write_bytes(b"partial")
    (tree / "CLEVRER" / "videos").mkdir()
    (tree / "CLEVRER" / "videos" / "v0.mp4").write_bytes(b"trunc")
    assert find_archives(tree) == sorted(find_archives(tree))
    r = extract_archive(z)
    assert r.status == "extracted" and r.files == 2
    assert (tree / "CLEVRER" / "videos" / "v0.mp4").read_bytes() == b"\0" * 1000
    assert not stale.exists() and marker_path(z).exists()


@pytest.mark.parametrize(
    "name",
    ["../escaped.txt", "a/../../escaped.txt", "/tmp/abs-escaped.txt", "..\\escaped.txt", "C:/escaped.txt"],
)
def test_zip_slip_refused(tmp_path, name):
    root = tmp_path / "root"
    z = make_zip(root / "evil" / "evil.zip", {"good.txt": b"good", name: b"bad"})
    r = extract_archive(z)
    assert r.status == "error" and "unsafe" in r.error and repr(name) in r.error
    assert not (root / "evil" / "good.txt").exists()  # refused before anything was written
    assert not (root / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/abs-escaped.txt").exists()
    assert not marker_path(z).exists()


def test_symlink_entry_refused(tmp_path):
    root = tmp_path / "root"
    z = make_symlink_zip(root / "d" / "link.zip", "link", "/etc/passwd")
    r = extract_archive(z)
    assert r.status == "error" and "symlink" in r.error
    assert not (root / "d" / "link").exists() and not (root / "d" / "ok.txt").exists()


def test_existing_symlink_pointing_outside_is_not_followed(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "d").mkdir(parents=True)
    (root / "d" / "videos").symlink_to(outside)
    z = make_zip(root / "d" / "x.zip", {"videos/v.mp4": b"x"})
    r = extract_archive(z)
    assert r.status == "error" and "outside" in r.error
    assert not (outside / "v.mp4").exists()


def test_corrupt_archives_named(tree):
    bad = tree / "NeXT-QA" / "NeXT-QA.zip"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a zip file" * 10)
    crc = make_zip(tree / "STAR" / "STAR.zip", {"s.mp4": b"A" * 4000})
    data = bytearray(crc.read_bytes())
    i = data.index(b"A" * 100) if b"A" * 100 in data else None
    # the payload is deflated; flip bytes in the compressed stream (just after the local header + name)
    start = 30 + len("s.mp4")
    for k in range(start + 2, start + 6):
        data[k] ^= 0xFF
    crc.write_bytes(bytes(data))
    assert i is None  # really compressed, so the flip corrupts the stream
    stored = tree / "PerceptionTest" / "pt.zip"  # stored (no compression): a flipped byte is a CRC error
    stored.parent.mkdir()
    with zipfile.ZipFile(stored, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("p.mp4", b"B" * 3000)
    data = bytearray(stored.read_bytes())
    data[data.index(b"B" * 100) + 50] ^= 0x01
    stored.write_bytes(bytes(data))
    results = {Path(r.archive).name: r for r in extract_all(tree, jobs=2)}
    assert results["NeXT-QA.zip"].status == "error" and "corrupt" in results["NeXT-QA.zip"].error
    assert results["STAR.zip"].status == "error" and "corrupt" in results["STAR.zip"].error
    assert results["pt.zip"].status == "error" and "CRC" in results["pt.zip"].error
    assert not (tree / "PerceptionTest" / "p.mp4").exists()
    assert not (tree / "STAR" / "s.mp4").exists() and not list(tree.rglob(f"{TMP_PREFIX}*"))
    assert results["CLEVRER.zip"].status == "extracted" and (tree / "CLEVRER" / "videos" / "v1.mp4").exists()


def test_unreadable_compression_and_encryption_are_errors_not_crashes(tmp_path):
    """zipfile raises NotImplementedError for a compression method it cannot read (Deflate64 = 9 here, common in
    Windows-made archives) and RuntimeError for an encrypted member: each is that archive's error, nothing is
    extracted, and no temp dir is left."""
    import struct

    def patched(name: str, offset_local: int, offset_central: int, value: int) -> Path:
        z = tmp_path / name / f"{name}.zip"
        z.parent.mkdir()
        with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("v.mp4", b"C" * 500)
        data = bytearray(z.read_bytes())
        central = data.index(b"PK\x01\x02")
        for at in (offset_local, central + offset_central):
            old = struct.unpack_from("<H", data, at)[0]
            struct.pack_into("<H", data, at, value if name == "deflate64" else old | value)
        z.write_bytes(bytes(data))
        return z

    # compression method: local header offset 8, central directory offset 10; flags: offsets 6 and 8 (bit 0 = encrypted)
    for z, expected in ((patched("deflate64", 8, 10, 9), "NotImplementedError"),
                        (patched("encrypted", 6, 8, 0x1), "RuntimeError")):
        r = extract_archive(z)
        assert r.status == "error" and r.error.startswith(expected), (z.name, r.error)
        assert not (z.parent / "v.mp4").exists() and not list(z.parent.glob(f"{TMP_PREFIX}*"))


def test_cli_unzip_summary_exit_code_and_registry(tree):
    bad = tree / "OCR" / "OCR.zip"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 truncated")
    res = run_cli("data", "unzip", tree, "--jobs", "2", check=False)
    assert res.exit_code == 1
    assert "OCR.zip" in res.output and "corrupt" in res.output and "1 failed" in res.output
    assert (tree / "Chart" / "chart" / "a.png").exists()
    bad.unlink()
    res = run_cli("data", "unzip", tree)
    assert res.exit_code == 0 and "0 extracted, 3 already done, 0 failed" in res.output
    import os

    reg = Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")
    runs = reg.list_runs(kind="data-unzip")
    assert len(runs) == 2
    latest = runs[0]
    m = reg.metrics_summary(latest["id"])
    assert m["archives"]["last"] == 3 and m["skipped"]["last"] == 3 and m["errors"]["last"] == 0
    first = reg.metrics_summary(runs[1]["id"])
    assert first["errors"]["last"] == 1 and first["files"]["last"] == 4 and first["bytes"]["last"] == 1510


def test_cli_unzip_not_a_directory(tmp_path):
    res = run_cli("data", "unzip", tmp_path / "missing", check=False)
    assert res.exit_code == 1 and "not a directory" in res.output
