"""Prompt templates as data: one YAML file per template, rendered into HF chat messages.

A template (``pipelines/prompts/<name>.yaml`` or any user YAML file) holds::

    name: video-r1
    question_template: "{Question}\\n..."          # train and SFT copy; must contain {Question}
    eval_question_template: "{Question}\\n..."     # eval copy (default: question_template)
    type_template: {multiple choice: " ...", numerical: " ...", OCR: " ...", free-form: " ...", regression: " ..."}
    options_header: "Options:\\n"                   # MC: problem + header + one option per line
    system: null                                   # RL/eval system message; null = none (chat template default)
    sft_system: "You are a helpful assistant"      # SFT system message; null = none
    assistant_format: "{process}\\n{solution}"      # SFT assistant turn

User text = ``question_template`` with ``{Question}`` replaced + ``type_template[problem_type]``, where the question
is ``problem`` and, for multiple choice, ``problem + options_header + "".join(o + "\\n" for o in options)`` (no
separator before the header: Video-R1's layout). ``{Question}``, ``{process}`` and ``{solution}`` are substituted
literally (``str.replace``, not ``str.format``), so other braces in a template or a question are kept as they are.

Messages carry no media paths: ``{"type": "video"}`` / ``{"type": "image"}`` is a placeholder, and the pipeline hands
the decoded frames to the processor separately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pipelines.errors import DataError, VideoR1Error

PROMPT_DIR = Path(__file__).parent
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
MEDIA_TYPES = ("video", "image")
Mode = Literal["train", "eval", "sft"]


class TemplateError(VideoR1Error):
    """A prompt template file that cannot be used: names the file and the field."""


@dataclass(frozen=True)
class Template:
    name: str
    question_template: str
    type_template: dict[str, str]
    eval_question_template: str | None = None
    options_header: str = "Options:\n"
    system: str | None = None
    sft_system: str | None = "You are a helpful assistant"
    assistant_format: str = "{process}\n{solution}"
    description: str = ""
    source: str = field(default="", compare=False)

    def question(self, mode: Mode = "train") -> str:
        if mode == "eval" and self.eval_question_template is not None:
            return self.eval_question_template
        return self.question_template


_STR_FIELDS = ("name", "question_template", "eval_question_template", "options_header", "system", "sft_system",
               "assistant_format", "description")
_REQUIRED = ("name", "question_template", "type_template")
_NULLABLE = ("eval_question_template", "system", "sft_system")


def list_templates() -> list[str]:
    """Names of the shipped templates (``pipelines/prompts/*.yaml``)."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


def load_template(name_or_path: str | Path) -> Template:
    """A shipped template by name (``video-r1``, ``answer-only``) or a user template by path to its YAML file."""
    if isinstance(name_or_path, Template):
        return name_or_path
    text = str(name_or_path)
    shipped = PROMPT_DIR / f"{text}.yaml"
    if "/" not in text and "\\" not in text and shipped.is_file():
        return _parse(shipped)
    path = Path(text).expanduser()
    if path.is_file():
        return _parse(path)
    looks_like_path = path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
    if looks_like_path:
        raise TemplateError(f"prompt template file {text} does not exist",
                            hint=f"shipped templates: {', '.join(list_templates())}")
    raise TemplateError(f"unknown prompt template '{text}'",
                        hint=f"shipped templates: {', '.join(list_templates())}; or give a path to a template YAML")


def _parse(path: Path) -> Template:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"prompt template {path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise TemplateError(f"prompt template {path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"prompt template {path}: expected a mapping of fields, got {type(data).__name__}")

    def bad(fld: str, msg: str) -> TemplateError:
        return TemplateError(f"prompt template {path}, field '{fld}': {msg}",
                             hint="see pipelines/prompts/video-r1.yaml for a complete template")

    known = set(_STR_FIELDS) | {"type_template"}
    for key in data:
        if key not in known:
            raise bad(str(key), f"unknown field (known: {', '.join(sorted(known))})")
    for key in _REQUIRED:
        if data.get(key) is None:
            raise bad(key, "missing")
    for key in _STR_FIELDS:
        if key in data and not isinstance(data[key], str) and not (data[key] is None and key in _NULLABLE):
            raise bad(key, f"must be a string{' or null' if key in _NULLABLE else ''}, "
                           f"got {type(data[key]).__name__}")
    for key in ("question_template", "eval_question_template"):
        if isinstance(data.get(key), str) and "{Question}" not in data[key]:
            raise bad(key, "must contain {Question}")
    types = data["type_template"]
    if not isinstance(types, dict) or not types:
        raise bad("type_template", "must be a non-empty mapping problem_type -> suffix")
    for k, v in types.items():
        if not isinstance(v, str):
            raise bad(f"type_template.{k}", f"must be a string, got {type(v).__name__}")
    kwargs: dict[str, Any] = {k: data[k] for k in _STR_FIELDS if k in data}
    return Template(type_template={str(k): v for k, v in types.items()}, source=str(path), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
def _get(record: Mapping[str, Any], key: str) -> Any:
    try:
        return record[key]
    except (KeyError, TypeError):
        raise DataError("missing", index=_rid(record), field=key) from None


def _rid(record: Mapping[str, Any]) -> Any:
    try:
        return record.get("problem_id")
    except AttributeError:
        return None


def question_text(record: Mapping[str, Any], template: Template | str, mode: Mode = "train") -> str:
    """The user text of one record: the question (with options for MC), the instruction and the type suffix."""
    if mode not in ("train", "eval", "sft"):
        raise ValueError(f"mode must be train, eval or sft, got {mode!r}")
    tpl = load_template(template)
    problem = _get(record, "problem")
    ptype = _get(record, "problem_type")
    if not isinstance(problem, str):
        raise DataError(f"must be a string, got {type(problem).__name__}", index=_rid(record), field="problem")
    if ptype not in tpl.type_template:
        raise DataError(f"problem_type {ptype!r} has no suffix in prompt template '{tpl.name}'",
                        index=_rid(record), field="problem_type",
                        hint=f"template types: {', '.join(tpl.type_template)}")
    question = problem
    if ptype == "multiple choice":
        options = record.get("options") or []
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
            raise DataError("must be a list of strings", index=_rid(record), field="options")
        question = problem + tpl.options_header + "".join(o + "\n" for o in options)
    return tpl.question(mode).replace("{Question}", question) + tpl.type_template[ptype]


def _text_message(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def build_messages(record: Mapping[str, Any], template: Template | str, mode: Mode = "train") -> list[dict[str, Any]]:
    """HF chat messages of one record.

    train / eval: [system (only when the template sets one)], user [media placeholder, text].
    sft: system ``sft_system`` (unless null), the user turn (training copy), assistant ``process + "\\n" + solution``.
    """
    tpl = load_template(template)
    data_type = _get(record, "data_type")
    if data_type not in MEDIA_TYPES:
        raise DataError(f"must be 'video' or 'image', got {data_type!r}", index=_rid(record), field="data_type")
    text = question_text(record, tpl, "train" if mode == "sft" else mode)
    user = {"role": "user", "content": [{"type": data_type}, {"type": "text", "text": text}]}
    messages: list[dict[str, Any]] = []
    system = tpl.sft_system if mode == "sft" else tpl.system
    if system is not None:
        messages.append(_text_message("system", system))
    messages.append(user)
    if mode == "sft":
        parts = {}
        for key in ("process", "solution"):
            value = _get(record, key)
            if not isinstance(value, str):
                raise DataError(f"must be a string, got {type(value).__name__}", index=_rid(record), field=key)
            parts[key] = value
        # One pass, so a '{solution}' inside the process text is never expanded.
        answer = re.sub(r"\{(process|solution)\}", lambda m: parts[m.group(1)], tpl.assistant_format)
        messages.append(_text_message("assistant", answer))
    return messages


__all__ = ["Template", "TemplateError", "PROBLEM_TYPES", "list_templates", "load_template", "question_text",
           "build_messages"]
