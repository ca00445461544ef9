"""The local run registry: every command that does work is a row here.

SQLite (stdlib) in WAL mode, so several processes (eight training ranks, a second terminal running `runs ls`) can
read while one writes, and concurrent writers wait on a busy timeout instead of corrupting the file. No ORM or
tracking service does "config hash + git commit + artifact lineage" in one local file, hence this small module.

    with Registry(path).run("train-rl", config, argv) as run:
        run.use_artifact(data_artifact_id)              # lineage in
        run.log_metrics(step, {"reward": 0.5})
        run.log_artifact("model", out_dir)              # lineage out

A run ends as finished, failed (with the error) or interrupted (Ctrl-C / SIGTERM). A process killed with SIGKILL
cannot write its own ending; readers detect such a run (its pid is gone on this host) and mark it failed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    command TEXT,
    config TEXT,
    config_hash TEXT,
    git_commit TEXT,
    git_dirty INTEGER,
    versions TEXT,
    host TEXT,
    pid INTEGER,
    started_at REAL,
    ended_at REAL,
    error TEXT,
    run_dir TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER,
    hash TEXT,
    created_at REAL,
    meta TEXT
);
CREATE TABLE IF NOT EXISTS run_inputs (
    run_id TEXT NOT NULL REFERENCES runs(id),
    artifact_id TEXT NOT NULL REFERENCES artifacts(id),
    role TEXT,
    PRIMARY KEY (run_id, artifact_id)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    time REAL
);
CREATE TABLE IF NOT EXISTS tags (
    run_id TEXT NOT NULL REFERENCES runs(id),
    tag TEXT NOT NULL,
    PRIMARY KEY (run_id, tag)
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, name, step);
CREATE INDEX IF NOT EXISTS artifacts_path ON artifacts(path);
CREATE INDEX IF NOT EXISTS artifacts_run ON artifacts(run_id);
"""

STATUSES = ("running", "finished", "failed", "interrupted")
METRICS_FILE = "metrics.jsonl"  # beside every run, one JSON object per log_metrics call (as EasyR1's file logger)
_HASH_FULL_LIMIT = 64 * 1024 * 1024  # files above this are identified by (size, mtime, head, tail), not a full read


class RegistryError(RuntimeError):
    pass


def _now() -> float:
    return time.time()


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _HASH_FULL_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


def content_hash(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, hash) of a file, or of a directory as a manifest of (relative path, file hash)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size, "sha256:" + _file_digest(p)
    if p.is_dir():
        h = hashlib.sha256()
        total = 0
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            rel = f.relative_to(p).as_posix()
            total += f.stat().st_size
            h.update(f"{rel}\0{_file_digest(f)}\n".encode())
        return total, "manifest:" + h.hexdigest()
    raise RegistryError(f"artifact path does not exist: {p}")


def git_state(cwd: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git work tree around cwd, or (None, None) outside one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if not commit:
            return None, None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in (
        "videor1", "torch", "transformers", "trl", "accelerate", "datasets", "peft", "deepspeed", "vllm",
        "decord", "av", "huggingface_hub",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Artifact:
    id: str
    run_id: str
    kind: str
    path: str
    size: int | None
    hash: str | None
    created_at: float
    meta: dict[str, Any]


class Registry:
    """A handle on one registry database. Cheap to create; each call opens a short-lived connection."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(SCHEMA)

    # -- connection ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=60000")
            con.execute("PRAGMA foreign_keys=ON")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    def _write(self, sql: str, params: tuple | list = ()) -> None:
        self._write_many([(sql, params)])

    def _write_many(self, statements: list[tuple[str, tuple | list]]) -> None:
        # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on busy_timeout rather than
        # failing half-way through a transaction.
        for attempt in range(20):
            try:
                with self._connect() as con:
                    con.execute("BEGIN IMMEDIATE")
                    try:
                        for sql, params in statements:
                            con.execute(sql, params)
                        con.execute("COMMIT")
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise RegistryError(f"registry {self.path} stayed locked; another process holds it")

    # -- runs ----------------------------------------------------------------------------------------------------
    def start_run(
        self,
        kind: str,
        config: Any = None,
        command: str | None = None,
        name: str | None = None,
        run_dir: str | None = None,
        tags: list[str] | None = None,
    ) -> "Run":
        run_id = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        if config is not None and hasattr(config, "model_dump"):
            cfg_json = json.dumps(config.model_dump(mode="json"), sort_keys=True)
        else:
            cfg_json = json.dumps(config or {}, sort_keys=True, default=str)
        cfg_hash = hashlib.sha256(cfg_json.encode()).hexdigest()[:16]
        commit, dirty = git_state()
        self._write(
            "INSERT INTO runs (id, name, kind, status, command, config, config_hash, git_commit, git_dirty, versions,"
            " host, pid, started_at, run_dir) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                run_id, name or f"{kind}-{run_id}", kind, "running", command or " ".join(sys.argv), cfg_json,
                cfg_hash, commit, None if dirty is None else int(dirty), json.dumps(package_versions()),
                socket.gethostname(), os.getpid(), _now(), run_dir,
            ),
        )
        run = Run(self, run_id)
        for t in tags or []:
            run.tag(t)
        return run

    @contextlib.contextmanager
    def run(self, kind: str, config: Any = None, command: str | None = None, **kw: Any) -> Iterator["Run"]:
        """A run that always ends with a status: finished, failed (with the error) or interrupted."""
        run = self.start_run(kind, config, command, **kw)
        restore = _install_sigterm_handler()
        try:
            yield run
        except KeyboardInterrupt:
            run.end("interrupted", "interrupted by Ctrl-C or SIGTERM")
            raise
        except BaseException as e:  # noqa: BLE001 - record, then re-raise whatever it was
            if isinstance(e, SystemExit) and e.code in (0, None):
                run.end("finished")
            else:
                run.end("failed", f"{type(e).__name__}: {e}")
            raise
        else:
            run.end("finished")
        finally:
            restore()

    def get_run(self, run_id: str) -> dict[str, Any]:
        self.reap()
        with self._connect() as con:
            row = con.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                rows = con.execute("SELECT * FROM runs WHERE id LIKE ? OR name = ?", (f"%{run_id}%", run_id)).fetchall()
                if len(rows) == 1:
                    row = rows[0]
                elif len(rows) > 1:
                    raise RegistryError(f"run id '{run_id}' is ambiguous: {', '.join(r['id'] for r in rows[:5])}")
            if row is None:
                raise RegistryError(f"no run '{run_id}' in {self.path}")
            d = dict(row)
            d["tags"] = [r["tag"] for r in con.execute("SELECT tag FROM tags WHERE run_id = ?", (d["id"],))]
        d["config"] = json.loads(d["config"]) if d["config"] else {}
        d["versions"] = json.loads(d["versions"]) if d["versions"] else {}
        d["summary"] = json.loads(d["summary"]) if d["summary"] else {}
        return d

    def list_runs(
        self, kind: str | None = None, status: str | None = None, tag: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        self.reap()
        sql = "SELECT r.* FROM runs r"
        where, params = [], []
        if tag:
            sql += " JOIN tags t ON t.run_id = r.id"
            where.append("t.tag = ?")
            params.append(tag)
        if kind:
            where.append("r.kind = ?")
            params.append(kind)
        if status:
            where.append("r.status = ?")
            params.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.started_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._connect() as con:
            rows = [dict(r) for r in con.execute(sql, params)]
            for r in rows:
                r["tags"] = [t["tag"] for t in con.execute("SELECT tag FROM tags WHERE run_id = ?", (r["id"],))]
        for r in rows:
            r["summary"] = json.loads(r["summary"]) if r["summary"] else {}
        return rows

    def reap(self) -> int:
        """Mark runs whose process died without ending them (SIGKILL, OOM killer) as failed."""
        host = socket.gethostname()
        with self._connect() as con:
            rows = con.execute("SELECT id, pid FROM runs WHERE status = 'running' AND host = ?", (host,)).fetchall()
        dead = [r["id"] for r in rows if r["pid"] and r["pid"] != os.getpid() and not _pid_alive(r["pid"])]
        if dead:
            # It ended when it was last seen alive, not when someone noticed: its "took" must not grow until then.
            self._write_many(
                [
                    (
                        "UPDATE runs SET status='failed', ended_at=?, error=? WHERE id=? AND status='running'",
                        (self.last_seen(rid), "process died without ending the run (killed?)", rid),
                    )
                    for rid in dead
                ]
            )
        return len(dead)

    def last_seen(self, run_id: str) -> float:
        """The last sign of life of a run: its newest metric, artifact or metrics.jsonl line, else its start."""
        with self._connect() as con:
            row = con.execute(
                "SELECT r.started_at, r.run_dir, (SELECT MAX(time) FROM metrics WHERE run_id = r.id), "
                "(SELECT MAX(created_at) FROM artifacts WHERE run_id = r.id) FROM runs r WHERE r.id = ?", (run_id,)
            ).fetchone()
        if row is None:
            return _now()
        times = [t for t in (row[0], row[2], row[3]) if t is not None]
        if row[1]:
            try:
                times.append((Path(row[1]) / METRICS_FILE).stat().st_mtime)
            except OSError:
                pass
        return max(times) if times else _now()

    # -- artifacts and lineage ------------------------------------------------------------------------------------
    def get_artifact(self, artifact_id: str) -> Artifact:
        with self._connect() as con:
            row = con.execute("SELECT * FROM artifacts WHERE id = ?", (artifact_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no artifact '{artifact_id}'")
        return _artifact(row)

    def find_artifact(self, path: str | os.PathLike, kind: str | None = None) -> Artifact | None:
        """The newest artifact recorded at this path whose content still matches (None if none or changed)."""
        p = str(Path(path).resolve())
        with self._connect() as con:
            sql, params = "SELECT * FROM artifacts WHERE path = ?", [p]
            if kind:
                sql += " AND kind = ?"
                params.append(kind)
            rows = con.execute(sql + " ORDER BY created_at DESC", params).fetchall()
        if not rows:
            return None
        try:
            _, h = content_hash(p)
        except RegistryError:
            return None
        for row in rows:
            if row["hash"] == h:
                return _artifact(row)
        return None

    def artifacts_of(self, run_id: str) -> dict[str, list[Artifact]]:
        with self._connect() as con:
            outs = con.execute("SELECT * FROM artifacts WHERE run_id = ? ORDER BY created_at", (run_id,)).fetchall()
            ins = con.execute(
                "SELECT a.* FROM artifacts a JOIN run_inputs i ON i.artifact_id = a.id WHERE i.run_id = ?", (run_id,)
            ).fetchall()
        return {"inputs": [_artifact(r) for r in ins], "outputs": [_artifact(r) for r in outs]}

    def parents(self, run_id: str) -> list[str]:
        """Runs that produced this run's inputs."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT DISTINCT a.run_id FROM run_inputs i JOIN artifacts a ON a.id = i.artifact_id "
                "WHERE i.run_id = ? AND a.run_id != ?",
                (run_id, run_id),
            ).fetchall()
        return [r[0] for r in rows]

    def children(self, run_id: str) -> list[str]:
        """Runs that used this run's outputs."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT DISTINCT i.run_id FROM artifacts a JOIN run_inputs i ON i.artifact_id = a.id "
                "WHERE a.run_id = ? AND i.run_id != ?",
                (run_id, run_id),
            ).fetchall()
        return [r[0] for r in rows]

    def run_owning(self, path: str | os.PathLike, exclude: str | None = None) -> str | None:
        """The newest run whose directory (or configured sft/rl output directory) holds `path`: e.g. the run that
        wrote a checkpoint."""
        p = Path(path).resolve()
        with self._connect() as con:
            rows = con.execute("SELECT id, run_dir, config FROM runs ORDER BY started_at DESC").fetchall()
        for r in rows:
            if r["id"] == exclude:
                continue
            places = [r["run_dir"]]
            try:
                cfg = json.loads(r["config"] or "{}")
                places += [(cfg.get(s) or {}).get("output_dir") for s in ("sft", "rl")]
            except (ValueError, AttributeError):
                pass
            for d in places:
                if d and p.is_relative_to(Path(d).resolve()):
                    return r["id"]
        return None

    def lineage(self, run_id: str, direction: str = "up") -> dict[str, Any]:
        """A tree {id, kind, status, children: [...]} following parents (up) or children (down)."""
        seen: set[str] = set()

        def node(rid: str) -> dict[str, Any]:
            r = self.get_run(rid)
            out = {"id": r["id"], "kind": r["kind"], "status": r["status"], "name": r["name"], "next": []}
            if rid in seen:
                return out
            seen.add(rid)
            nxt = self.parents(rid) if direction == "up" else self.children(rid)
            out["next"] = [node(x) for x in nxt]
            return out

        return node(self.get_run(run_id)["id"])

    # -- metrics -------------------------------------------------------------------------------------------------
    def metrics(self, run_id: str, names: list[str] | None = None) -> dict[str, list[tuple[int, float]]]:
        with self._connect() as con:
            sql, params = "SELECT step, name, value FROM metrics WHERE run_id = ?", [run_id]
            if names:
                sql += f" AND name IN ({','.join('?' * len(names))})"
                params += list(names)
            rows = con.execute(sql + " ORDER BY name, step", params).fetchall()
        out: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            out.setdefault(r["name"], []).append((r["step"], r["value"]))
        return out

    def metrics_summary(self, run_id: str) -> dict[str, dict[str, float]]:
        """Per metric: last value, min, max, mean and number of points."""
        out = {}
        for name, series in self.metrics(run_id).items():
            vals = [v for _, v in series if v is not None]
            if not vals:
                continue
            out[name] = {
                "last": vals[-1], "min": min(vals), "max": max(vals), "mean": sum(vals) / len(vals),
                "n": len(vals), "last_step": series[-1][0],
            }
        return out

    # -- deletion ------------------------------------------------------------------------------------------------
    def dependents(self, run_id: str) -> list[str]:
        """Other runs that use an artifact this run produced (deleting it would break their lineage)."""
        return self.children(run_id)

    def delete_run(self, run_id: str, force: bool = False) -> None:
        deps = self.dependents(run_id)
        if deps and not force:
            raise RegistryError(
                f"run {run_id} produced artifacts that runs {', '.join(deps)} depend on; not deleted"
            )
        self._write_many(
            [
                ("DELETE FROM metrics WHERE run_id = ?", (run_id,)),
                ("DELETE FROM tags WHERE run_id = ?", (run_id,)),
                ("DELETE FROM run_inputs WHERE run_id = ?", (run_id,)),
                ("DELETE FROM run_inputs WHERE artifact_id IN (SELECT id FROM artifacts WHERE run_id = ?)", (run_id,)),
                ("DELETE FROM artifacts WHERE run_id = ?", (run_id,)),
                ("DELETE FROM runs WHERE id = ?", (run_id,)),
            ]
        )


def append_metrics_line(path: Path, step: int, t: float, values: dict[str, float]) -> None:
    """One line {"step", "time", name: value, ...}; non-finite values are written as null (strict JSON)."""
    import math

    line = {"step": step, "time": round(t, 3), **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:  # the registry has the values; a read-only run dir must not stop training
        pass


def _artifact(row: sqlite3.Row) -> Artifact:
    return Artifact(
        id=row["id"], run_id=row["run_id"], kind=row["kind"], path=row["path"], size=row["size"], hash=row["hash"],
        created_at=row["created_at"], meta=json.loads(row["meta"]) if row["meta"] else {},
    )


class Run:
    """One registered run; what a pipeline receives to record inputs, outputs and metrics."""

    def __init__(self, registry: Registry, run_id: str):
        self.registry = registry
        self.id = run_id
        self._lock = threading.Lock()
        self.metrics_file: Path | None = None  # <run dir>/metrics.jsonl once the run has a directory

    @property
    def info(self) -> dict[str, Any]:
        return self.registry.get_run(self.id)

    def tag(self, tag: str) -> None:
        self.registry._write("INSERT OR IGNORE INTO tags (run_id, tag) VALUES (?, ?)", (self.id, tag))

    def set_run_dir(self, run_dir: str | os.PathLike) -> None:
        self.registry._write("UPDATE runs SET run_dir = ? WHERE id = ?", (str(Path(run_dir).resolve()), self.id))
        self.attach_dir(run_dir)

    def attach_dir(self, run_dir: str | os.PathLike) -> None:
        """Also write every log_metrics call to <run_dir>/metrics.jsonl (without touching the registry row)."""
        self.metrics_file = Path(run_dir) / METRICS_FILE

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        t = _now()
        rows, clean = [], {}
        for k, v in values.items():
            if v is None:
                continue
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            clean[k] = fv
            rows.append(("INSERT INTO metrics (run_id, step, name, value, time) VALUES (?,?,?,?,?)",
                         (self.id, int(step), k, fv, t)))
        if rows:
            with self._lock:
                self.registry._write_many(rows)
                if self.metrics_file is not None:
                    append_metrics_line(self.metrics_file, int(step), t, clean)

    def log_artifact(
        self, kind: str, path: str | os.PathLike, meta: dict[str, Any] | None = None, hash_content: bool = True
    ) -> str:
        p = Path(path).resolve()
        size, h = content_hash(p) if hash_content else (None, None)
        aid = "a-" + uuid.uuid4().hex[:10]
        self.registry._write(
            "INSERT INTO artifacts (id, run_id, kind, path, size, hash, created_at, meta) VALUES (?,?,?,?,?,?,?,?)",
            (aid, self.id, kind, str(p), size, h, _now(), json.dumps(meta or {}, default=str)),
        )
        return aid

    def use_artifact(self, artifact_id: str, role: str | None = None) -> None:
        self.registry._write(
            "INSERT OR IGNORE INTO run_inputs (run_id, artifact_id, role) VALUES (?,?,?)", (self.id, artifact_id, role)
        )

    def use_path(self, kind: str, path: str | os.PathLike, role: str | None = None) -> str | None:
        """Record a file/directory input: link the artifact that produced it, or register it as external input."""
        p = Path(path)
        if not p.exists():
            return None
        art = self.registry.find_artifact(p)
        if art is None:
            # Produced outside videor1 (downloaded by hand, a hub model): recorded as an output of this run with
            # kind 'external:<kind>' so lineage still names its content hash.
            aid = self.log_artifact(f"external:{kind}", p)
        else:
            aid = art.id
        self.use_artifact(aid, role or kind)
        return aid

    def continues(self, checkpoint: str | os.PathLike) -> str | None:
        """This run resumed from `checkpoint`: record it as a 'checkpoint' output of the run that wrote it and an
        input of this one, so lineage (and the model card) includes the steps that run made. Returns that run's id.
        Not content-hashed: a 7B checkpoint is tens of GB, and the edge, not the bytes, is what is recorded."""
        owner = self.registry.run_owning(checkpoint, exclude=self.id)
        if owner is None:
            return None
        aid = Run(self.registry, owner).log_artifact("checkpoint", checkpoint, meta={"resumed_by": self.id},
                                                     hash_content=False)
        self.use_artifact(aid, role="resumed-from")
        return owner

    def set_summary(self, summary: dict[str, Any]) -> None:
        self.registry._write("UPDATE runs SET summary = ? WHERE id = ?", (json.dumps(summary, default=str), self.id))

    def end(self, status: str, error: str | None = None) -> None:
        assert status in STATUSES
        self.registry._write(
            "UPDATE runs SET status = ?, ended_at = ?, error = ? WHERE id = ?", (status, _now(), error, self.id)
        )


def _install_sigterm_handler():
    """Turn SIGTERM into KeyboardInterrupt (so the run is marked interrupted); returns a restore function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt("SIGTERM")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)
