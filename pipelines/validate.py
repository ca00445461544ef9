"""Check a records file before training on it (`videor1 data validate`), and describe it (`videor1 data stats`).

Validation is one streaming pass over the raw records (bounded memory; duplicate detection keeps one 16-byte digest
per record). Every problem becomes an `Issue` {index, problem_id, kind, field, message, severity}; nothing stops at
the first one. Kinds:

errors
  ``invalid_json``        the file cannot be parsed past this record (the pass stops there)
  ``schema``              a field is missing or has a wrong type/value (one issue per field)
  ``missing_media``       ``path`` does not exist under the root
  ``empty_media``         the media file has 0 bytes (found without ``decode``)
  ``undecodable_media``   the media cannot be decoded (only with ``decode=True``; each file is decoded once)
  ``mc_without_options``  a multiple-choice record with no options
  ``answer_not_in_options`` the MC answer is not one of the option letters
  ``missing_answer_tags`` ``solution`` has no ``<answer>...</answer>``
  ``duplicate_id``        ``problem_id`` seen before (the message names the first record)
  ``duplicate_question``  the same (path, problem) pair seen before
  ``data_type_mismatch``  ``data_type`` disagrees with the file extension (``video`` with ``.png``)
warnings
  ``options_on_non_mc``   a non-MC record with options (Video-R1 prompts ignore them)
  ``unparsed_option``     an MC option without a leading letter (``A.``, ``(A)``, ``A)``, ``A:``)
  ``unknown_extension``   the media extension is neither a known video nor image format
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from pipelines.errors import DataError
from pipelines.records import iter_raw_records, record_errors, resolve_media

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg", ".3gp", ".ts"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
BOTH_EXTS = {".gif"}
ERROR_KINDS = ("invalid_json", "schema", "missing_media", "empty_media", "undecodable_media", "mc_without_options",
               "answer_not_in_options", "missing_answer_tags", "duplicate_id", "duplicate_question",
               "data_type_mismatch")
WARNING_KINDS = ("options_on_non_mc", "unparsed_option", "unknown_extension")

_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_OPTION = re.compile(r"^\s*\(?([A-Za-z])\s*[\.\):：]")


@dataclass
class Issue:
    index: Optional[int]
    problem_id: Any
    kind: str
    field: Optional[str]
    message: str
    severity: str = "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ValidationReport:
    file: str
    root: str
    records: int = 0
    media_checked: int = 0
    decoded: bool = False
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    def counts(self) -> dict[str, int]:
        """Issues per kind, in the documented order of kinds (errors first)."""
        c = Counter(i.kind for i in self.issues)
        return {k: c[k] for k in (*ERROR_KINDS, *WARNING_KINDS) if c[k]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "root": self.root, "records": self.records, "media_checked": self.media_checked,
            "decoded": self.decoded, "errors": len(self.errors), "warnings": len(self.warnings),
            "by_kind": self.counts(), "issues": [i.to_dict() for i in self.issues],
        }


def extract_answer(solution: str) -> Optional[str]:
    """Content of the first ``<answer>...</answer>`` (stripped), or None without tags (Video-R1's rule)."""
    m = _ANSWER.search(solution)
    return m.group(1).strip() if m else None


def option_letter(option: str) -> Optional[str]:
    m = _OPTION.match(option)
    return m.group(1).upper() if m else None


def media_kind(path: str) -> Optional[str]:
    ext = posixpath.splitext(path.lower())[1]
    if ext in VIDEO_EXTS:
        return "video"
    if ext in IMAGE_EXTS:
        return "image"
    if ext in BOTH_EXTS:
        return "either"
    return None


# The checks every stage (sft, rl, eval, annotate) runs on a record when it loads it: a record failing one is skipped
# and counted there, as `data validate` reports it here.
LOAD_CHECK_KINDS = ("mc_without_options", "answer_not_in_options")


def answer_problems(rec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A multiple-choice record's answer against its options, as (kind, field, message); [] when fine or not MC.

    Pure. The one check `data validate` and every stage share (`check_record`)."""
    if rec.get("problem_type") != "multiple choice":
        return []
    options = rec.get("options") or []
    if not options:
        return [("mc_without_options", "options", "multiple-choice record without options")]
    letters = [x for x in (option_letter(o) for o in options) if x is not None]
    answer = extract_answer(rec.get("solution") or "")
    if answer is not None and letters and answer not in letters:
        return [("answer_not_in_options", "solution",
                 f"answer {answer[:40]!r} is not one of the option letters {''.join(letters)}")]
    return []


def check_record(rec: dict[str, Any], file: str | os.PathLike | None = None, index: Any = None) -> None:
    """Raise DataError (file, record index, field) when a loaded record fails a LOAD_CHECK_KINDS check.

    Stages call this per sample inside their skip handling, so a bad record is skipped and counted like an unreadable
    video, and judged by data.max_skip_fraction."""
    for kind, fld, msg in answer_problems(rec):
        raise DataError(f"{msg} ({kind})", file=str(file) if file else None, index=index, field=fld,
                        hint="`videor1 data validate FILE` lists every such record")


def check_semantics(rec: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Problems of one schema-valid record, as (kind, field, message, severity). Pure: no I/O."""
    out = []
    ptype, options = rec["problem_type"], rec.get("options") or []
    answer = extract_answer(rec["solution"])
    if answer is None:
        out.append(("missing_answer_tags", "solution", f"no <answer>...</answer> in {rec['solution'][:60]!r}",
                    "error"))
    if ptype == "multiple choice":
        for i, opt in enumerate(options):
            if option_letter(opt) is None:
                out.append(("unparsed_option", f"options.{i}", f"option without a leading letter: {opt[:40]!r}",
                            "warning"))
        out += [(kind, fld, msg, "error") for kind, fld, msg in answer_problems(rec)]
    elif options:
        out.append(("options_on_non_mc", "options", f"{ptype} record has {len(options)} options (ignored by the "
                    "Video-R1 prompt)", "warning"))
    kind = media_kind(rec["path"])
    if kind is None:
        out.append(("unknown_extension", "path", f"unknown media extension: {rec['path'][-40:]!r}", "warning"))
    elif kind != "either" and kind != rec["data_type"]:
        out.append(("data_type_mismatch", "data_type",
                    f"data_type is {rec['data_type']!r} but {posixpath.basename(rec['path'])!r} is a {kind} file",
                    "error"))
    return out


def _digest(*parts: str) -> bytes:
    return hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _decode_check(path: Path, data_type: str, video_cfg: Any, image_cfg: Any) -> Optional[str]:
    """None when the media decodes, else the reason."""
    from pipelines.errors import MediaError

    try:
        if data_type == "video":
            from pipelines.video import sample_video

            sample_video(str(path), video_cfg)
        else:
            from pipelines.video import load_image

            load_image(str(path), image_cfg)
    except MediaError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - any decoder failure is a finding, not a crash of the whole check
        return f"{type(e).__name__}: {e}"
    return None


def validate_file(
    file: str | os.PathLike,
    root: str | os.PathLike,
    *,
    decode: bool = False,
    video_cfg: Any = None,
    image_cfg: Any = None,
    progress: Optional[Callable[[int], None]] = None,
) -> ValidationReport:
    """Check every record of ``file`` (media resolved against ``root``); returns a report, never raises for data.

    ``decode`` also decodes each distinct media file once with `pipelines.video` (``video_cfg``/``image_cfg``,
    default: the schema defaults). ``progress(index)`` is called after each record.
    """
    if decode and (video_cfg is None or image_cfg is None):
        from pipelines.config import ImageConfig, VideoConfig

        video_cfg = video_cfg or VideoConfig()
        image_cfg = image_cfg or ImageConfig()
    rep = ValidationReport(file=str(file), root=str(Path(root).resolve()), decoded=decode)
    first_id: dict[Any, int] = {}
    first_q: dict[bytes, int] = {}
    media: dict[str, Optional[tuple[str, str]]] = {}  # resolved path -> None (ok) | (kind, message)

    def add(idx, pid, kind, fld, msg, sev="error"):
        rep.issues.append(Issue(idx, pid, kind, fld, msg, sev))

    try:
        for idx, obj in iter_raw_records(file):
            rep.records += 1
            pid = obj.get("problem_id") if isinstance(obj, dict) else None
            errs = record_errors(obj)
            if errs:
                for fld, msg in errs:
                    add(idx, pid, "schema", fld, msg)
            else:
                for kind, fld, msg, sev in check_semantics(obj):
                    add(idx, pid, kind, fld, msg, sev)
            if isinstance(obj, dict):
                if isinstance(pid, (int, str)) and not isinstance(pid, bool):
                    key = str(pid)  # 1 and "1" are the same id once a column holds both
                    if key in first_id:
                        add(idx, pid, "duplicate_id", "problem_id",
                            f"problem_id {pid!r} already used by record {first_id[key]}")
                    else:
                        first_id[key] = idx
                path, problem = obj.get("path"), obj.get("problem")
                if isinstance(path, str) and path and isinstance(problem, str):
                    q = _digest(posixpath.normpath(path.replace("\\", "/")), problem)
                    if q in first_q:
                        add(idx, pid, "duplicate_question", "problem",
                            f"same (path, problem) as record {first_q[q]}")
                    else:
                        first_q[q] = idx
                    resolved = resolve_media(path, root)
                    key = str(resolved)
                    if key not in media:
                        rep.media_checked += 1
                        if not resolved.is_file():
                            media[key] = ("missing_media", f"not found: {resolved}")
                        elif resolved.stat().st_size == 0:
                            media[key] = ("empty_media", f"{resolved}: empty file (0 bytes)")
                        elif decode:
                            dtype = obj.get("data_type")
                            dtype = dtype if dtype in ("image", "video") else (media_kind(path) or "video")
                            if dtype == "either":
                                dtype = "image"
                            reason = _decode_check(resolved, dtype, video_cfg, image_cfg)
                            media[key] = ("undecodable_media", f"{resolved}: {reason}") if reason else None
                        else:
                            media[key] = None
                    found = media[key]
                    if found:
                        add(idx, pid, found[0], "path", found[1])
            if progress:
                progress(idx)
    except DataError as e:
        add(e.index, None, "invalid_json", None, str(e))
    return rep


# ---------------------------------------------------------------------------------------------------------------------
# Stats
def compute_stats(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts by data_type / problem_type / data_source, unique media, questions per media (mean, max).

    ``records`` is any iterable of record dicts (a `load_records` dataset works). Media are identified by their
    normalised ``path`` string, so no root is needed.
    """
    n = 0
    by_dtype: Counter = Counter()
    by_ptype: Counter = Counter()
    by_source: Counter = Counter()
    per_media: dict[str, Counter] = {"video": Counter(), "image": Counter()}
    for r in records:
        n += 1
        dt = r.get("data_type")
        by_dtype[dt or "<missing>"] += 1
        by_ptype[r.get("problem_type") or "<missing>"] += 1
        by_source[r.get("data_source") or "<none>"] += 1
        path = r.get("path")
        if dt in per_media and isinstance(path, str):
            per_media[dt][posixpath.normpath(path.replace("\\", "/"))] += 1

    def per(c: Counter) -> dict[str, Any]:
        total = sum(c.values())
        return {
            "unique": len(c),
            "questions": total,
            "questions_per_item_mean": round(total / len(c), 4) if c else 0.0,
            "questions_per_item_max": max(c.values()) if c else 0,
        }

    def ordered(c: Counter) -> dict[str, int]:
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0]))))

    return {
        "records": n,
        "by_data_type": ordered(by_dtype),
        "by_problem_type": ordered(by_ptype),
        "by_data_source": ordered(by_source),
        "unique_media": len(per_media["video"]) + len(per_media["image"]),
        "videos": per(per_media["video"]),
        "images": per(per_media["image"]),
    }
