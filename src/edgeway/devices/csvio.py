"""CSV import and export of device records.

Columns (a header row names them; any order; only ``id`` is required)::

    id,name,type,tags,groups,credentials,firmware,metadata
    boiler-1,Boiler 1,boiler,site=north;floor=2,heating,mqtt-password:boiler-1,,"{""room"": ""B12""}"

Lists (tags, groups, credentials) are separated by ``;`` (or ``,`` inside a
quoted cell); ``metadata`` is a JSON object. Export writes the same columns
plus the observed ones (status, protocols, last_seen, ...), so an export can
be imported elsewhere as it is (observed columns are ignored on import).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from edgeway.devices.registry import Device

IMPORT_COLUMNS = ("id", "name", "type", "tags", "groups", "credentials", "firmware", "metadata")
OBSERVED_COLUMNS = (
    "status",
    "protocols",
    "last_seen",
    "last_connect",
    "last_disconnect",
    "disconnect_reason",
    "created",
    "updated",
)
"""Export-only columns: what the gateway observed; an import skips them."""
MAX_ROWS = 200_000
"""Rows one import may carry: twice the registry size we promise to keep fast."""


class CsvError(Exception):
    """The file as a whole cannot be read (no header, no id column, too big)."""


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet takes for a formula at the start of a cell: an export
prefixes such a cell with ``'`` (OWASP's advice against CSV injection; a
device's own reported firmware version ends up in these files), and an
import takes that prefix off again."""


def _unescape(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_START) else cell


def _list(cell: str) -> list[str]:
    sep = ";" if ";" in cell else ","
    return [v.strip() for v in cell.split(sep) if v.strip()]


def parse_csv(data: bytes) -> list[tuple[int, Mapping[str, Any]]]:
    """The rows of an import file as (row number, fields) for
    :meth:`~edgeway.devices.registry.DeviceRegistry.add_many`; blank cells are
    left out (the field's default). Row numbers count the header as 1."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CsvError(f"not UTF-8: {e}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise CsvError("empty file: a header row (id,name,type,...) is needed") from None
    except csv.Error as e:
        raise CsvError(f"row 1: {e}") from None
    columns = [h.strip().lower() for h in header]
    if "id" not in columns:
        raise CsvError("the header row has no 'id' column")
    unknown = set(columns) - set(IMPORT_COLUMNS) - set(OBSERVED_COLUMNS) - {""}
    if unknown:
        raise CsvError(f"unknown columns: {', '.join(sorted(unknown))}")
    rows: list[tuple[int, Mapping[str, Any]]] = []
    n = 1
    try:
        for n, cells in enumerate(reader, start=2):
            if not any(c.strip() for c in cells):
                continue
            if len(rows) >= MAX_ROWS:
                raise CsvError(f"more than {MAX_ROWS} rows: split the file")
            fields: dict[str, Any] = {}
            for col, raw in zip(columns, cells, strict=False):
                cell = _unescape(raw.strip())
                if col not in IMPORT_COLUMNS or (not cell and col != "id"):
                    continue
                fields[col] = _list(cell) if col in ("tags", "groups", "credentials") else cell
            rows.append((n, fields))
    except csv.Error as e:
        raise CsvError(f"row {n + 1}: {e}") from None
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        text = ";".join(value)
    elif isinstance(value, dict):
        text = orjson.dumps(value).decode() if value else ""
    else:
        text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def export_rows(devices: Sequence[Device], *, header: bool) -> str:
    """CSV text for ``devices`` (with the header row when ``header``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow((*IMPORT_COLUMNS, *OBSERVED_COLUMNS))
    for d in devices:
        doc = d.to_json()
        writer.writerow([_cell(doc[c]) for c in (*IMPORT_COLUMNS, *OBSERVED_COLUMNS)])
    return out.getvalue()
