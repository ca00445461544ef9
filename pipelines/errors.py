"""Errors a user can act on. The CLI prints them as one line plus a hint (a traceback only with --debug)."""

from __future__ import annotations


class VideoR1Error(Exception):
    """Base of user-facing errors; `hint` says what to do next."""

    exit_code = 1

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
