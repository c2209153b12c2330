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

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from edgeway.config import Config
from edgeway.config_types import _parse_duration, _parse_size

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
    """The default as one would write it in the YAML file (``true``, ``1MiB``, ``7d``)."""
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
    if value in ([], {}):
        return "empty"
    kind = _field_type(info)
    if kind.startswith("duration") and isinstance(value, int | float):
        text = format_duration(float(value))
    elif kind.startswith("size") and isinstance(value, int):
        text = format_size(value)
    else:
        text = _yaml(_plain(value))
    return "(see meaning)" if len(text) > 60 else f"`{text}`"


def _plain(value: Any) -> Any:
    """``value`` as the YAML loader would give it back (models as mappings)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _yaml(value: Any) -> str:
    """One line of flow-style YAML, quoted only where YAML needs it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def format_duration(seconds: float) -> str:
    """``7d``, ``10s``, ``250ms``: the largest unit that gives a whole number."""
    for unit, factor in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001)):
        count = seconds / factor
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """``1MiB``, ``64KiB``, ``1000``: the largest binary unit that divides it."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


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
        out += _table(rows)
    out.append(_SINKS_HEADER)
    for schemes, model, page in _sink_types():
        rows = []
        _walk(model, "options.", rows, set())
        names = ", ".join(f"`{s}://`" for s in schemes)
        out.append(f"\n## `sinks[].options` for {names}\n")
        out.append(f"See [sinks/{page}](sinks/{page}).\n")
        out += _table(rows)
    return "\n".join(out) + "\n"


_SINKS_HEADER = """
# Sink options

Each sink's `options:` are checked by its type (the URL's scheme), by
`edgeway check` as at start-up. Every type takes the batching keys
`max_records`, `max_bytes` and `max_wait`, some with their own defaults.
"""


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | meaning |\n|---|---|---|---|"]
    out += [f"| `{key}` | {typ} | {default} | {meaning} |" for key, typ, default, meaning in rows]
    return out


def _sink_types() -> list[tuple[list[str], type[BaseModel], str]]:
    """(URL schemes, options model, docs page) of every built-in sink type."""
    from edgeway.sinks import SCHEME_MODULES
    from edgeway.sinks.base import sink_class_for

    by_class: dict[type[Any], list[str]] = {}
    for scheme in SCHEME_MODULES:
        by_class.setdefault(sink_class_for(f"{scheme}://"), []).append(scheme)
    out = []
    for cls, schemes in by_class.items():
        module = SCHEME_MODULES[schemes[0]]
        page = "postgresql.md" if module == "postgres" else f"{module}.md"
        out.append((schemes, cls.options_model, page))
    return out


if __name__ == "__main__":  # pragma: no cover
    print(render_reference(), end="")
