"""Errors a user can act on. The CLI prints them as one line plus a hint (a traceback only with --debug)."""

from __future__ import annotations


class VideoR1Error(Exception):
    """Base of user-facing errors; `hint` says what to do next."""

    exit_code = 1
    # Whether `--resume auto` can get past this failure (a crash, a full disk once space is freed): the launcher only
    # then suggests it. A bad record, a bad setting or a checkpoint that cannot be restored fail the same way again.
    resumable = False

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class DataError(VideoR1Error):
    """A bad record: names the file, the record index (or id) and the field."""

    def __init__(self, message: str, file: str | None = None, index: int | None = None, field: str | None = None,
                 hint: str | None = None):
        where = []
        if file:
            where.append(str(file))
        if index is not None:
            where.append(f"record {index}")
        if field:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message, hint)
        self.file, self.index, self.field = file, index, field


class MediaError(VideoR1Error):
    """A video or image that is missing or cannot be decoded; names the path."""

    def __init__(self, path: str, reason: str, hint: str | None = None):
        super().__init__(f"cannot read media {path}: {reason}", hint)
        self.path, self.reason = str(path), reason


class TrainingError(VideoR1Error):
    """Training stopped for a reason the user must look at (NaN loss, diverged)."""

    resumable = True


class CheckpointError(VideoR1Error):
    """A checkpoint that cannot be fully restored (a file missing, written by another number of ranks, another base
    model or adapter layout, weights that do not load as saved): refused before anything is half-loaded."""


class StorageError(VideoR1Error):
    """Writing or reading a file failed in the operating system (disk full, permission, read-only): names the path."""

    resumable = True

    def __init__(self, path: str, error: OSError, what: str = "file", verb: str = "write", hint: str | None = None):
        import errno as _errno
        import os as _os

        reason = error.strerror or str(error)
        code = f" (errno {error.errno}: {_errno.errorcode.get(error.errno, '?')})" if error.errno else ""
        if hint is None:
            if error.errno == _errno.ENOSPC:
                hint = f"free space on the disk holding {path} (or point run.output_dir at another disk)"
            elif error.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
                hint = f"make {_os.path.dirname(str(path)) or path} writable, or point run.output_dir elsewhere"
        super().__init__(f"cannot {verb} {what} {path}: {reason}{code}", hint)
        self.path, self.errno = str(path), error.errno


# Samples seen before the skip rate is judged: a handful of broken records at the start of a big set is not a trend.
SKIP_CHECK_MIN_SAMPLES = 64


def check_skip_rate(skipped: int, seen: int, max_fraction: float, *, dataset_size: int, file: str | None,
                    example: str = "", what: str = "training samples", final: bool = False) -> None:
    """Raise DataError when more than `max_fraction` of the `seen` samples were skipped.

    Skips are counted and training goes on (a few unreadable videos in 260k records should not stop a run), but a
    run that skips most of its data - record paths resolved against the wrong folder, a partial download - trains
    on nothing and would still save a model. Judged once `seen` reaches SKIP_CHECK_MIN_SAMPLES (or the whole set,
    when it is smaller), and with ``final`` (the stage's end) on whatever was seen: a short run never reaches 64,
    and a stage that consumed nothing fails even with max_fraction = 1. Checkpoints already written are kept."""
    eg = f" (e.g. {example})" if example else ""
    if final and seen <= 0:
        raise DataError(f"no {what} were read: nothing to work on", file=file,
                        hint="check --data / data.max_samples; `videor1 data stats FILE` counts the records")
    where = ("record paths resolve against data.root (default: the records file's folder); `videor1 data "
             "validate` lists what is unreadable")
    hint = where + ". To go on with what remains: --set data.max_skip_fraction=1"
    if final and seen > 0 and skipped >= seen:  # everything skipped is never a success, whatever the fraction
        raise DataError(f"all {seen} {what} were skipped{eg}", file=file, hint=where)
    if seen <= 0 or (not final and seen < min(SKIP_CHECK_MIN_SAMPLES, max(1, dataset_size))):
        return
    if skipped / seen <= max_fraction:
        return
    when = "in all" if final else "so far"
    raise DataError(
        f"skipped {skipped} of {seen} {what} {when}{eg}, more than data.max_skip_fraction = {max_fraction:g}",
        file=file,
        hint=hint,
    )


def storage_errors(path, what: str = "file", verb: str = "write"):
    """A context manager turning an OSError (ENOSPC, EACCES, EROFS...) raised inside into a StorageError naming the
    path: a bare ``OSError [Errno 28]`` from a write says neither which file nor which disk."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        try:
            yield
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(str(e.filename or path), e, what, verb) from e

    return cm()
