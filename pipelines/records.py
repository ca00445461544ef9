"""Video-R1 records: the schema, loading through `datasets`, media path resolution, writing.

A Video-R1 record (the 260k RL file, the 165k CoT file, the eval files) is one JSON object::

    {"problem_id": 12, "problem": "...", "data_type": "video", "problem_type": "multiple choice",
     "options": ["A. red", "B. blue"], "solution": "<answer>B</answer>",
     "path": "./LLaVA-Video-178K/.../ytb_x.mp4", "data_source": "LLaVA-Video-178K/30_60_s_youtube_v0_1",
     "process": "<think>...</think>"}          # process: CoT file only

Files are a JSON list (Video-R1's format) or JSONL; the format is read from the content (a leading ``[`` means a
list), so a ``.json`` file holding JSONL also loads.

`load_records` returns a `datasets.Dataset`: Arrow on disk, memory-mapped and cached, so eight training ranks share
one copy of 260k records instead of each holding a list of dicts. Loading is two streaming passes over the file
(bounded memory, never the whole list as Python objects): the first validates every record with the pydantic
`Record` model and collects the column types, the second writes Arrow through `Dataset.from_generator`. Both are
cached, keyed by the file's (absolute path, size, mtime): a second load of an unchanged file reads only Arrow.

Column normalisation (Arrow needs one type per column), chosen so that `write_records(load_records(f))` gives back
the same records:

- ``problem_id`` stays ``int64`` when every id in the file is an int (the Video-R1 files), or ``string`` when every
  id is a string. A file that mixes both gets a ``string`` column (1 and "1" are then the same id; `videor1 data
  validate` reports such ids as duplicates). That mixed case is the only one that does not round-trip.
- ``options`` is always ``list<string>`` (``[]`` for non-MC); ``data_source`` defaults to ``""``; ``process`` is
  a column only when some record has one (``None`` elsewhere, and written back as an absent key).
- Extra keys are carried through as columns: a key whose values are all bool / all int / int-or-float / all str
  keeps that type (``None`` where a record lacks it, and absent again when written). Anything else (lists, objects,
  mixed types) is stored as a JSON-encoded string; `json_columns(ds)` names those columns, and `write_records` and
  `record_dict` decode them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.errors import DataError

DATA_TYPES = ("image", "video")
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
CORE_FIELDS = ("problem_id", "problem", "data_type", "problem_type", "options", "solution", "path", "data_source")
OPTIONAL_FIELDS = ("process",)
_SCAN_VERSION = 1  # bump when the scan/normalisation rules change (invalidates cached scans)
_CHUNK = 1 << 20


class Record(BaseModel):
    """One Video-R1 record. Unknown keys are kept (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow", strict=False)

    problem_id: Union[int, str]
    problem: str
    data_type: Literal["image", "video"]
    problem_type: Literal["multiple choice", "numerical", "OCR", "free-form", "regression"]
    options: list[str] = []
    solution: str
    path: str
    data_source: str = ""
    process: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Reading raw records (streaming)
def detect_format(file: str | os.PathLike) -> Literal["json", "jsonl"]:
    """'json' (a JSON list) when the first non-blank character is ``[``, else 'jsonl' (one object per line)."""
    with open(file, encoding="utf-8") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return "jsonl" if str(file).endswith(".jsonl") else "json"
            s = chunk.lstrip()
            if s:
                return "json" if s[0] == "[" else "jsonl"


def iter_raw_records(file: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (index, parsed JSON value) for each record of a JSON list or JSONL file, without loading it whole.

    A syntax error raises DataError naming the file and the record index (and the line for JSONL).
    """
    path = Path(file)
    if not path.is_file():
        raise DataError("records file not found", file=str(path), hint="check --data / FILE")
    if detect_format(path) == "jsonl":
        yield from _iter_jsonl(path)
    else:
        yield from _iter_json_list(path)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    idx = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON on line {lineno}: {e.msg} (column {e.colno})", file=str(path),
                                index=idx) from None
            yield idx, obj
            idx += 1


def _iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            more = f.read(_CHUNK)
            if not more:
                eof = True
                return False
            buf, pos = buf[pos:] + more, 0
            return True

        def skip_ws() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not fill():
                    return ""

        if skip_ws() != "[":
            raise DataError("not a JSON list (expected '[')", file=str(path))
        pos += 1
        idx = 0
        while True:
            c = skip_ws()
            if c == "]":
                pos += 1
                if skip_ws() != "":
                    raise DataError("extra data after the closing ']'", file=str(path))
                return
            if c == "":
                raise DataError("file ends inside the JSON list (truncated?)", file=str(path), index=idx)
            if idx > 0:
                if c != ",":
                    raise DataError(f"expected ',' or ']' between records, got {c!r}", file=str(path), index=idx)
                pos += 1
                if skip_ws() == "":
                    raise DataError("file ends inside the JSON list (truncated?)", file=str(path), index=idx)
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    # An object cut by the chunk boundary fails near the buffer's end (or as an unterminated
                    # string): read more and retry. An error well inside the buffer is a real syntax error.
                    near_end = e.pos >= len(buf) - 256 or e.msg.startswith("Unterminated string")
                    if near_end and fill():
                        continue
                    line = buf.count("\n", 0, e.pos)  # relative; only a hint
                    raise DataError(f"invalid JSON: {e.msg} (+{line} lines into the record)", file=str(path),
                                    index=idx) from None
                if end >= len(buf) and not eof and fill():
                    continue  # a bare number could have been cut by the boundary: decode it again whole
                break
            yield idx, obj
            pos = end
            idx += 1
            if pos > _CHUNK:
                buf, pos = buf[pos:], 0


def record_errors(obj: Any) -> list[tuple[str, str]]:
    """Schema problems of one raw record as (field, message); [] when it is a valid `Record`."""
    if not isinstance(obj, dict):
        return [("<record>", f"expected a JSON object, got {type(obj).__name__}")]
    try:
        Record.model_validate(obj)
    except ValidationError as e:
        out = []
        for err in e.errors():
            loc = err["loc"]
            field = str(loc[0]) if loc else "<record>"
            if len(loc) > 1 and loc[0] == "problem_id":  # union branches: one message is enough
                if any(f == "problem_id" for f, _ in out):
                    continue
                out.append((field, f"must be an int or a string, got {type(obj.get('problem_id')).__name__}"))
                continue
            if len(loc) > 1:
                field = ".".join(str(x) for x in loc)
            msg = err["msg"]
            if err["type"] == "missing":
                msg = "missing"
            elif "input" in err and err["type"] != "missing":
                msg = f"{msg} (got {_short(err['input'])})"
            out.append((field, msg))
        return out
    return []


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Scan: validation + column types
def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    return "json"


def _column_kind(kinds: set[str]) -> str:
    kinds = kinds - {"null"}
    if not kinds:
        return "str"
    if kinds == {"int", "float"}:
        return "float"
    if len(kinds) == 1:
        return next(iter(kinds))
    return "json"


def _scan(path: Path, validate: bool) -> dict[str, Any]:
    id_kinds: set[str] = set()
    extra: dict[str, set[str]] = {}
    has_process = False
    count = 0
    for idx, obj in iter_raw_records(path):
        if validate:
            errs = record_errors(obj)
            if errs:
                field, msg = errs[0]
                more = f" (+{len(errs) - 1} more problems)" if len(errs) > 1 else ""
                raise DataError(msg + more, file=str(path), index=idx, field=field,
                                hint="`videor1 data validate FILE` lists every problem")
        elif not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=str(path), index=idx)
        id_kinds.add(_kind(obj.get("problem_id")))
        if obj.get("process") is not None:
            has_process = True
        for k, v in obj.items():
            if k in CORE_FIELDS or k in OPTIONAL_FIELDS:
                continue
            extra.setdefault(k, set()).add(_kind(v))
        count += 1
    id_kinds.discard("null")
    return {
        "version": _SCAN_VERSION,
        "count": count,
        "validated": validate,
        "problem_id": "int" if id_kinds <= {"int"} and id_kinds else "str",
        "process": has_process,
        "extra": {k: _column_kind(v) for k, v in extra.items()},
    }


def _identity(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{_SCAN_VERSION}".encode()).hexdigest()[:24]


def _scan_cached(path: Path, validate: bool, cache_dir: Path) -> dict[str, Any]:
    cache_file = cache_dir / f"{_identity(path)}.json"
    try:
        scan = json.loads(cache_file.read_text())
        if scan.get("version") == _SCAN_VERSION and (scan.get("validated") or not validate):
            return scan
    except (OSError, ValueError):
        pass
    scan = _scan(path, validate)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache_dir, delete=False, suffix=".tmp") as tmp:
            json.dump(scan, tmp)
        os.replace(tmp.name, cache_file)
    except OSError:
        pass
    return scan


_VALUE = {"bool": "bool", "int": "int64", "float": "float64", "str": "string", "json": "string"}


def _features(scan: dict[str, Any]):
    from datasets import Features, List, Value

    cols: dict[str, Any] = {
        "problem_id": Value("int64" if scan["problem_id"] == "int" else "string"),
        "problem": Value("string"),
        "data_type": Value("string"),
        "problem_type": Value("string"),
        "options": List(Value("string")),
        "solution": Value("string"),
        "path": Value("string"),
        "data_source": Value("string"),
    }
    if scan["process"]:
        cols["process"] = Value("string")
    for k, kind in scan["extra"].items():
        cols[k] = Value(_VALUE[kind])
    return Features(cols)


def _generate(file: str, scan: dict[str, Any], identity: str):  # noqa: ARG001 - identity keys the datasets cache
    """Rows for `Dataset.from_generator` (top-level so datasets can fingerprint it)."""
    pid_int = scan["problem_id"] == "int"
    extra = scan["extra"]
    for _, obj in iter_raw_records(file):
        pid = obj.get("problem_id")
        row = {
            "problem_id": pid if (pid_int or pid is None) else str(pid),
            "problem": obj.get("problem"),
            "data_type": obj.get("data_type"),
            "problem_type": obj.get("problem_type"),
            "options": list(obj.get("options") or []),
            "solution": obj.get("solution"),
            "path": obj.get("path"),
            "data_source": obj.get("data_source", ""),
        }
        if scan["process"]:
            row["process"] = obj.get("process")
        for k, kind in extra.items():
            v = obj.get(k)
            if v is not None and kind == "json":
                v = json.dumps(v, ensure_ascii=False)
            elif v is not None and kind == "float":
                v = float(v)
            row[k] = v
        yield row


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


def load_records(file: str | os.PathLike, *, validate: bool = True, cache_dir: str | os.PathLike | None = None):
    """Load a Video-R1 JSON list or JSONL file as a `datasets.Dataset` (Arrow, memory-mapped, cached).

    With ``validate`` (default) every record is checked against `Record` in a streaming pass; the first bad record
    raises `DataError` naming the file, the record index and the field. ``cache_dir`` defaults to the datasets cache.
    See the module docstring for how columns are normalised.
    """
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    path = Path(file).resolve()
    if not path.is_file():
        raise DataError("records file not found", file=str(file), hint="check --data / FILE")
    root = _cache_root(cache_dir)
    scan = _scan_cached(path, validate, root / "videor1_records")
    bars = is_progress_bar_enabled()
    if scan["count"] < 50_000 and bars:
        disable_progress_bar()  # the "Generating train split" bar is noise for small files
    try:
        ds = Dataset.from_generator(
            _generate,
            features=_features(scan),
            cache_dir=str(root) if cache_dir else None,
            gen_kwargs={"file": str(path), "scan": scan, "identity": _identity(path)},
        )
    finally:
        if bars:
            enable_progress_bar()
    ds.info.description = json.dumps({"videor1": {"source": str(path), "json_columns": _json_cols(scan)}})
    return ds


def _json_cols(scan: dict[str, Any]) -> list[str]:
    return sorted(k for k, kind in scan["extra"].items() if kind == "json")


def json_columns(ds) -> list[str]:
    """Columns of a `load_records` dataset that hold JSON-encoded extra values."""
    try:
        return list(json.loads(ds.info.description or "{}").get("videor1", {}).get("json_columns", []))
    except (ValueError, AttributeError):
        return []


def record_dict(row: Mapping[str, Any], json_cols: Iterable[str] = ()) -> dict[str, Any]:
    """A dataset row back as the original record: JSON extras decoded, absent optional/extra keys dropped."""
    out: dict[str, Any] = {}
    jc = set(json_cols)
    for k, v in row.items():
        if k in CORE_FIELDS and k != "data_source":
            out[k] = v
        elif v is None:
            continue
        elif k in jc:
            out[k] = json.loads(v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Paths
def default_root(file: str | os.PathLike) -> Path:
    """Where record paths resolve when no root is given: the directory holding the records file."""
    return Path(file).resolve().parent


def resolve_media(record: Mapping[str, Any] | str, root: str | os.PathLike) -> Path:
    """The media file of a record: its ``path`` joined to ``root`` (never the cwd); absolute paths stay as they are.

    Video-R1 paths look like ``./LLaVA-Video-178K/.../x.mp4``; Windows-style separators are accepted.
    """
    raw = record if isinstance(record, str) else record.get("path")
    if not isinstance(raw, str) or not raw:
        raise DataError("record has no media path", field="path")
    p = raw.replace("\\", "/")
    if p.startswith("/") or re.match(r"^[A-Za-z]:/", p):
        return Path(raw)
    norm = posixpath.normpath(p)
    return Path(root).expanduser().resolve() / norm


# ---------------------------------------------------------------------------------------------------------------------
# Writing
def write_records(records: Iterable[Any], path: str | os.PathLike, *, fmt: str | None = None) -> int:
    """Write records as a JSON list (``.json``, Video-R1's format) or JSONL (``.jsonl``); returns the count.

    ``records`` may be a `load_records` dataset, dicts or `Record`s. Written atomically (temp file + rename).
    """
    path = Path(path)
    fmt = fmt or ("jsonl" if path.suffix == ".jsonl" else "json")
    jc = json_columns(records) if hasattr(records, "info") and hasattr(records, "features") else []
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if fmt == "json":
                f.write("[")
            for rec in records:
                if isinstance(rec, BaseModel):
                    d = rec.model_dump(exclude_none=True)
                elif jc or hasattr(records, "features"):
                    d = record_dict(rec, jc)
                else:
                    d = dict(rec)
                s = json.dumps(d, ensure_ascii=False)
                if fmt == "json":
                    f.write(("\n" if n == 0 else ",\n") + s)
                else:
                    f.write(s + "\n")
                n += 1
            if fmt == "json":
                f.write("\n]\n" if n else "]\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n
