"""`videor1 data fetch`: from a local mirror directory (--source), and from a real local hub server (olah).

The hub test starts `olah` (a self-hosted Hugging Face mirror, the `[test]` extra) on a free loopback port, serving a
dataset repo from a local git repository in offline mode, and runs the real CLI in a subprocess with HF_ENDPOINT
pointing at it (a subprocess because huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import time, and the test
session is offline). olah serves committed text files only (binary blobs are read as LFS pointers and fail), so the
repo holds JSON and text files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli

from pipelines.fetch import FetchError, fetch_mirror
from pipelines.registry import Registry


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Run dirs (videor1-runs/ under the cwd) land in the test's tmp dir, not the repo."""
    monkeypatch.chdir(tmp_path)

REPO = "Video-R1/Video-R1-data"
RL = [{"problem_id": 1, "problem": "q", "data_type": "video", "problem_type": "numerical", "options": [],
       "solution": "<answer>3</answer>", "path": "./CLEVRER/v.mp4", "data_source": "CLEVRER"}]


def _registry() -> Registry:
    return Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")


@pytest.fixture
def mirror(tmp_path):
    src = tmp_path / "mirror"
    (src / "CLEVRER").mkdir(parents=True)
    (src / "Video-R1-260k.json").write_text(json.dumps(RL))
    (src / "Video-R1-COT-165k.json").write_text("[]")
    (src / "CLEVRER" / "CLEVRER.zip").write_bytes(b"PK-not-really")
    (src / "README.md").write_text("card")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD.json").write_text("{}")  # never copied, even though it matches *.json
    return src


def test_fetch_mirror_links_and_skips(mirror, tmp_path):
    out = tmp_path / "out"
    res = fetch_mirror(mirror, out, repo_id=REPO, include=["*.json"])
    assert res.files == ["Video-R1-260k.json", "Video-R1-COT-165k.json"]
    assert res.linked == 2 and res.copied == 0 and res.skipped == 0
    assert (out / "Video-R1-260k.json").stat().st_ino == (mirror / "Video-R1-260k.json").stat().st_ino
    assert not (out / "CLEVRER").exists() and not (out / ".git").exists()
    again = fetch_mirror(mirror, out, repo_id=REPO, include=["*.json", "CLEVRER/*"])
    assert again.skipped == 2 and again.linked == 1 and (out / "CLEVRER" / "CLEVRER.zip").exists()


def test_fetch_mirror_copies_across_filesystems(mirror, tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out"
    res = fetch_mirror(mirror, out, repo_id=REPO, include=["*"])
    assert res.copied == 4 and res.linked == 0
    assert (out / "Video-R1-260k.json").read_text() == json.dumps(RL)
    assert (out / "Video-R1-260k.json").stat().st_ino != (mirror / "Video-R1-260k.json").stat().st_ino
    assert fetch_mirror(mirror, out, repo_id=REPO, include=["*"]).skipped == 4  # same size + mtime: identical
    (mirror / "README.md").write_text("a changed card")
    res = fetch_mirror(mirror, out, repo_id=REPO, include=["*"])
    assert res.copied == 1 and (out / "README.md").read_text() == "a changed card"
    assert not [p for p in out.rglob("*.part")]


def test_fetch_mirror_errors(tmp_path, mirror):
    with pytest.raises(FetchError, match="not found"):
        fetch_mirror(tmp_path / "nope", tmp_path / "out", repo_id=REPO)
    with pytest.raises(FetchError, match="--out is the --source"):
        fetch_mirror(mirror, mirror, repo_id=REPO)


def test_cli_fetch_source_records_artifact(mirror, tmp_path):
    out = tmp_path / "data"
    res = run_cli("data", "fetch", "--source", mirror, "--out", out, "--include", "*.json", "--include", "CLEVRER/*")
    assert "linked 3" in res.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "CLEVRER/CLEVRER.zip", "Video-R1-260k.json", "Video-R1-COT-165k.json"]
    reg = _registry()
    (run,) = reg.list_runs(kind="data-fetch")
    arts = reg.artifacts_of(run["id"])
    ds = [a for a in arts["outputs"] if a.kind == "dataset"]
    assert len(ds) == 1 and ds[0].path == str(out.resolve())
    meta = ds[0].meta
    assert {k: meta[k] for k in ("repo_id", "revision", "include", "source", "files")} == {
        "repo_id": REPO, "revision": None, "include": ["*.json", "CLEVRER/*"], "source": str(mirror.resolve()),
        "files": 3}
    assert meta["manifest"].startswith("files:")
    records = sorted(Path(a.path).name for a in arts["outputs"] if a.kind == "records")
    assert records == ["Video-R1-260k.json", "Video-R1-COT-165k.json"]
    assert any(a.kind == "external:mirror" for a in arts["inputs"])
    # the fetched records are usable as-is, and a validate run links back to the fetch run
    res = run_cli("data", "stats", out / "Video-R1-260k.json", "--json")
    assert json.loads(res.output)["records"] == 1
    run_cli("data", "validate", out / "Video-R1-260k.json", "--allow-errors")
    (val,) = reg.list_runs(kind="data-validate")
    assert reg.parents(val["id"]) == [run["id"]]


# ---------------------------------------------------------------------------------------------------------------------
# A real hub: olah on loopback
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def olah_hub(tmp_path):
    """A local olah server serving dataset REPO from a git repo (two commits); yields (endpoint, [sha1, sha2])."""
    pytest.importorskip("olah")
    exe = shutil.which("olah-cli") or str(Path(sys.executable).parent / "olah-cli")
    if not Path(exe).exists() or not shutil.which("git"):
        pytest.skip("olah-cli or git not available")
    base = tmp_path / "olah"
    repo = base / "mirrors" / "datasets" / REPO
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("---\nlicense: apache-2.0\n---\nVideo-R1 test copy\n")
    (repo / "Video-R1-260k.json").write_text(json.dumps(RL))
    (repo / "CLEVRER").mkdir()
    (repo / "CLEVRER" / "notes.txt").write_text("media would be zips here")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    sha1 = _git(repo, "rev-parse", "HEAD")
    (repo / "Video-R1-260k.json").write_text(json.dumps(RL * 2))
    (repo / "Video-R1-COT-165k.json").write_text("[]")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "second")
    sha2 = _git(repo, "rev-parse", "HEAD")
    port = _free_port()
    cfg = base / "olah.toml"
    cfg.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{base / "repos"}"\n'
        f'mirrors-path = ["{base / "mirrors"}"]\n\n[accessibility]\noffline = true\n'
    )
    log = open(base / "olah.log", "w")
    proc = subprocess.Popen([exe, "-c", str(cfg)], cwd=base, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/api/datasets/{REPO}/revision/main", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"olah did not start:\n{(base / 'olah.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield endpoint, [sha1, sha2]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _cli(args: list, env_extra: dict, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "VIDEOR1_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "videor1_cli.app", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=home.parent)


def test_fetch_from_local_hub(olah_hub, tmp_path):
    endpoint, (sha1, sha2) = olah_hub
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    home = tmp_path / "home"
    out = tmp_path / "Video-R1-data"
    p = _cli(["data", "fetch", "--out", out], env, home)  # default include: *.json, default revision: main
    assert p.returncode == 0, p.stdout + p.stderr
    files = sorted(x.relative_to(out).as_posix() for x in out.rglob("*") if x.is_file() and ".cache" not in x.parts)
    assert files == ["Video-R1-260k.json", "Video-R1-COT-165k.json"]
    assert json.loads((out / "Video-R1-260k.json").read_text()) == RL * 2
    reg = Registry(home / "registry.db")
    (run,) = reg.list_runs(kind="data-fetch")
    assert run["status"] == "finished"
    (art,) = [a for a in reg.artifacts_of(run["id"])["outputs"] if a.kind == "dataset"]
    assert {k: art.meta[k] for k in ("repo_id", "revision", "include")} == {
        "repo_id": REPO, "revision": sha2, "include": ["*.json"]}  # main resolved to its commit

    # a pinned older revision, other patterns, into another directory
    old = tmp_path / "old"
    p = _cli(["data", "fetch", "--out", old, "--revision", sha1, "--include", "*.json", "--include", "CLEVRER/*"],
             env, home)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((old / "Video-R1-260k.json").read_text()) == RL
    assert (old / "CLEVRER" / "notes.txt").read_text() == "media would be zips here"
    assert not (old / "Video-R1-COT-165k.json").exists()

    # errors are one line + exit 1
    p = _cli(["data", "fetch", "--out", tmp_path / "x", "--repo-id", "nobody/missing"], env, home)
    assert p.returncode == 1 and "not found" in p.stderr and "Traceback" not in p.stderr
