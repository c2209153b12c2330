"""Generates the complete configuration key reference from the schema.

``python -m edgeway.config_doc > docs/config-reference.md``. A test checks the
committed page matches, so the reference cannot drift from the code. The
descriptions are the attribute docstrings in ``edgeway.config``.
"""

from __future__ import annotations

import enum
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from edgeway.config import Config, _parse_duration, _parse_size

_HEADER = """# Configuration key reference

Generated from the schema by `python -m edgeway.config_doc`; do not edit by
hand. [configuration.md](configuration.md) explains the file, units and
command-line overrides, with examples; each protocol, sink and the pipeline
have their own page under [docs/](.).

`[]` after a key means a list of entries; `{}` a mapping. *required* keys have
no default. Durations accept `10s`, `250ms`, `5m`; sizes accept `512KiB`, `1MiB`.
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        suffix = " or null" if type(None) in args else ""
        return " or ".join(names) + suffix
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (list, tuple, set):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {_type_name(args[1])}" if len(args) == 2 else "map"
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            return "section"
        if issubclass(tp, enum.Enum):
            return " / ".join(f"`{m.value}`" for m in tp)
        return {
            "str": "string",
            "int": "integer",
            "float": "number",
            "bool": "boolean",
            "Path": "path",
        }.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _models_in(tp: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(tp)[0])
    if origin is not None:
        out: list[type[BaseModel]] = []
        for a in typing.get_args(tp):
            out.extend(_models_in(a))
        return out
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return []


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "*required*"
    if info.default_factory is not None:
        if getattr(info.default_factory, "__name__", "") == "gethostname":
            return "(the host name)"
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except Exception:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(section defaults)"
    else:
        value = info.default
    if value is None or value is PydanticUndefined:
        return "none"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    if value in ([], {}):
        return "empty"
    if isinstance(value, list | dict) and len(repr(value)) > 60:
        return "(see description)"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _field_type(info: FieldInfo) -> str:
    for meta in info.metadata:
        func = getattr(meta, "func", None)
        if func is _parse_duration:
            return "duration"
        if func is _parse_size:
            return "size"
    ann = info.annotation
    for arg in typing.get_args(ann):
        if typing.get_origin(arg) is typing.Annotated:
            for meta in typing.get_args(arg)[1:]:
                if getattr(meta, "func", None) is _parse_duration:
                    return "duration or null"
                if getattr(meta, "func", None) is _parse_size:
                    return "size or null"
    return _type_name(ann)


def _one_line(text: str | None) -> str:
    if not text:
        return ""
    return " ".join(text.split()).replace("|", "\\|")


def _walk(
    model: type[BaseModel], prefix: str, rows: list[tuple[str, str, str, str]], seen: set[str]
) -> None:
    for name, info in model.model_fields.items():
        ann = info.annotation
        key = f"{prefix}{name}"
        origin = typing.get_origin(ann)
        is_list = origin in (list, tuple) or (
            origin in (typing.Union, types.UnionType)
            and any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(ann))
        )
        models = _models_in(ann)
        shown = f"{key}[]" if is_list and models else key
        rows.append((shown, _field_type(info), _default(info), _one_line(info.description)))
        for sub in models:
            sub_prefix = f"{shown}."
            marker = f"{sub_prefix}{sub.__name__}"
            if marker in seen:
                continue
            seen.add(marker)
            _walk(sub, sub_prefix, rows, seen)


def render_reference() -> str:
    """The whole reference page as Markdown."""
    out = [_HEADER]
    for section, info in Config.model_fields.items():
        rows: list[tuple[str, str, str, str]] = []
        is_list = typing.get_origin(info.annotation) is list
        for sub in _models_in(info.annotation):
            _walk(sub, f"{section}{'[]' if is_list else ''}.", rows, set())
        out.append(f"\n## `{section}`\n")
        desc = _one_line(info.description)
        if desc:
            out.append(desc + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for key, typ, default, meaning in rows:
            out.append(f"| `{key}` | {typ} | {default} | {meaning} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render_reference(), end="")
