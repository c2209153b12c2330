"""The device registry: records, validation, listing with filters and paging,
change listeners, unregistered devices and their cap, status batches, CSV."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeway.devices.csvio import CsvError, export_rows, parse_csv
from edgeway.devices.registry import (
    DeviceError,
    DeviceFilter,
    DeviceRegistry,
    StatusUpdate,
)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[DeviceRegistry]:
    reg = DeviceRegistry(tmp_path / "devices.db", durability="os", max_unregistered=3)
    await reg.open()
    try:
        yield reg
    finally:
        await reg.close()


async def test_add_get_update_and_fields_round_trip(registry: DeviceRegistry) -> None:
    d = await registry.add(
        {
            "id": "boiler-1",
            "name": "Boiler 1",
            "type": "boiler",
            "tags": ["site=north", "floor=2", "site=north"],
            "groups": "heating, north",
            "credentials": ["mqtt-password:boiler-1"],
            "metadata": {"room": "B12"},
        }
    )
    assert d.status == "offline" and d.registered and d.enabled and not d.online
    assert d.tags == ("floor=2", "site=north")  # sorted, duplicates once
    assert d.groups == ("heating", "north")
    got = await registry.get("boiler-1")
    assert got == d
    u = await registry.update("boiler-1", {"name": "Boiler one", "tags": []})
    assert u.name == "Boiler one" and u.tags == () and u.type == "boiler"
    assert u.updated >= d.updated
    # The tag side table follows: the old tag no longer selects it.
    page = await registry.list(DeviceFilter(tag="site=north"))
    assert page.devices == [] and page.total == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "a/b"}, "id"),
        ({"id": "#"}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"id": "ok", "tags": ["has space"]}, "tags"),
        ({"id": "ok", "tags": [f"t{i}" for i in range(33)]}, "tags"),
        ({"id": "ok", "metadata": {"k": "v" * 5000}}, "metadata"),
        ({"id": "ok", "metadata": "[1]"}, "metadata"),
        ({"id": "ok", "name": "a\nb"}, "name"),
    ],
)
async def test_invalid_fields_are_refused_naming_the_field(
    registry: DeviceRegistry, body: dict[str, object], field: str
) -> None:
    with pytest.raises(DeviceError) as e:
        await registry.add(body)
    assert e.value.code == "invalid" and e.value.field == field
    assert await registry.get("ok") is None


async def test_unknown_field_refused(registry: DeviceRegistry) -> None:
    with pytest.raises(DeviceError, match="unknown fields: colour"):
        await registry.add({"id": "d1", "colour": "red"})


async def test_add_twice_is_exists_and_missing_is_not_found(registry: DeviceRegistry) -> None:
    await registry.add({"id": "d1"})
    with pytest.raises(DeviceError) as e:
        await registry.add({"id": "d1"})
    assert e.value.code == "exists"
    for call in (registry.disable("nope"), registry.update("nope", {}), registry.remove("nope")):
        with pytest.raises(DeviceError) as e:
            await call
        assert e.value.code == "not_found"


async def test_change_listeners_see_every_change_after_it_is_on_disk(
    registry: DeviceRegistry,
) -> None:
    seen: list[tuple[str, str, str | None]] = []

    def listener(device_id: str, change: str) -> None:
        # The flags cache is already exact when a listener runs.
        seen.append((device_id, change, None))

    registry.on_change(listener)
    await registry.add({"id": "d1"})
    assert (await registry.flags("d1")) is not None
    await registry.disable("d1")
    flags = await registry.flags("d1")
    assert flags is not None and not flags.enabled
    assert (await registry.get("d1")).status == "disabled"  # type: ignore[union-attr]
    await registry.enable("d1")
    await registry.update("d1", {"type": "meter"})
    await registry.remove("d1")
    assert [c for _, c, _ in seen] == ["added", "disabled", "enabled", "updated", "removed"]
    assert await registry.flags("d1") is None


async def test_status_batches_create_unregistered_records_up_to_the_cap(
    registry: DeviceRegistry,
) -> None:
    await registry.add({"id": "known"})
    updates = [StatusUpdate(f"stranger-{i}", last_seen=100.0 + i, online=True) for i in range(5)]
    updates.append(StatusUpdate("known", last_seen=50.0, online=True, protocols={"http"}))
    updates.append(StatusUpdate("bad id with spaces", last_seen=1.0))
    written = await registry.record_status(updates)
    assert written == 4  # known + 3 strangers (cap 3)
    assert registry.unregistered == 3 and registry.unregistered_refused == 3
    page = await registry.list(DeviceFilter(status="unregistered"))
    assert [d.id for d in page.devices] == ["stranger-0", "stranger-1", "stranger-2"]
    known = await registry.get("known")
    assert known is not None and known.status == "online" and known.protocols == ("http",)
    # Registering a seen device keeps what was seen and frees a place.
    d = await registry.add({"id": "stranger-1", "type": "meter"})
    assert d.registered and d.last_seen == 101.0 and d.status == "online"
    assert registry.unregistered == 2
    await registry.record_status([StatusUpdate("stranger-9", last_seen=9.0)])
    assert registry.unregistered == 3


async def test_status_fields_merge_and_protocols_accumulate(registry: DeviceRegistry) -> None:
    await registry.add({"id": "d1"})
    await registry.record_status(
        [StatusUpdate("d1", online=True, connected=True, last_connect=10.0, protocols={"mqtt"})]
    )
    await registry.record_status(
        [
            StatusUpdate(
                "d1",
                online=False,
                connected=False,
                last_disconnect=20.0,
                disconnect_reason="keepalive",
                protocols={"coap"},
                firmware="1.2.3",
            )
        ]
    )
    d = await registry.get("d1")
    assert d is not None
    assert (d.status, d.last_connect, d.last_disconnect, d.disconnect_reason) == (
        "offline",
        10.0,
        20.0,
        "keepalive",
    )
    assert d.protocols == ("coap", "mqtt") and d.firmware == "1.2.3"


async def test_mark_idle_only_touches_devices_without_a_connection(
    registry: DeviceRegistry,
) -> None:
    await registry.record_status(
        [
            StatusUpdate("http-dev", last_seen=10.0, online=True),
            StatusUpdate("mqtt-dev", last_seen=10.0, online=True, connected=True),
            StatusUpdate("fresh", last_seen=100.0, online=True),
        ]
    )
    assert await registry.mark_idle(50.0) == 1
    statuses = {d.id: d.online for d in (await registry.list()).devices}
    assert statuses == {"fresh": True, "http-dev": False, "mqtt-dev": True}


async def test_list_filters_and_keyset_paging(registry: DeviceRegistry) -> None:
    report = await registry.add_many(
        [
            (
                i + 2,
                {
                    "id": f"dev-{i:03d}",
                    "type": "meter" if i % 2 else "valve",
                    "tags": [f"floor={i % 3}"],
                    "groups": ["a"] if i < 10 else ["b"],
                },
            )
            for i in range(25)
        ]
    )
    assert len(report.created) == 25 and report.refused == []
    await registry.record_status(
        [StatusUpdate(f"dev-{i:03d}", online=True, protocols={"mqtt"}) for i in range(0, 25, 5)]
    )
    ids: list[str] = []
    after = None
    while True:
        page = await registry.list(DeviceFilter(status="offline"), limit=7, after=after)
        assert page.total == (20 if after is None else None)
        ids += [d.id for d in page.devices]
        if page.next_after is None:
            break
        after = page.next_after
    assert ids == [f"dev-{i:03d}" for i in range(25) if i % 5]
    both = await registry.list(DeviceFilter(type="meter", tag="floor=1", group="a"))
    assert [d.id for d in both.devices] == ["dev-001", "dev-007"]
    online = await registry.list(DeviceFilter(status="online", protocol="mqtt"))
    assert online.total == 5
    prefix = await registry.list(DeviceFilter(prefix="dev-02"))
    assert [d.id for d in prefix.devices] == [f"dev-02{i}" for i in range(5)]
    with pytest.raises(DeviceError):
        await registry.list(DeviceFilter(status="asleep"))
    assert (await registry.counts())["online"] == 5


async def test_import_report_names_refused_rows(registry: DeviceRegistry) -> None:
    await registry.add({"id": "exists"})
    csv_text = (
        "id,name,type,tags,metadata,status\n"
        "ok-1,One,meter,a;b,,online\n"
        "bad/id,Two,meter,,,\n"
        "exists,Three,,,,\n"
        "ok-1,Dup,,,,\n"
        'ok-2,Four,,,"{""room"": 5}",\n'
        "ok-3,Five,,,[1],\n"
    )
    rows = parse_csv(csv_text.encode())
    report = await registry.add_many(rows)
    assert report.created == ["ok-1", "ok-2"]
    assert [(n, i) for n, i, _ in report.refused] == [
        (3, "bad/id"),
        (4, "exists"),
        (5, "ok-1"),
        (7, "ok-3"),
    ]
    ok2 = await registry.get("ok-2")
    assert ok2 is not None and ok2.metadata == {"room": 5}
    ok1 = await registry.get("ok-1")
    assert ok1 is not None and ok1.tags == ("a", "b") and ok1.status == "offline"
    # Export and import elsewhere give the same records.
    text = export_rows((await registry.list()).devices, header=True)
    again = parse_csv(text.encode())
    assert [r["id"] for _, r in again] == ["exists", "ok-1", "ok-2"]
    assert dict(again[1][1])["tags"] == ["a", "b"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"name,type\nx,y\n", "no 'id' column"),
        (b"id,colour\nx,red\n", "unknown columns: colour"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_csv_file_errors(data: bytes, message: str) -> None:
    with pytest.raises(CsvError, match=message):
        parse_csv(data)


async def test_records_survive_reopen_and_start_offline(tmp_path: Path) -> None:
    path = tmp_path / "devices.db"
    reg = DeviceRegistry(path, durability="os")
    await reg.open()
    await reg.add({"id": "d1"})
    await reg.record_status([StatusUpdate("d1", online=True, connected=True, last_connect=1.0)])
    await reg.record_status([StatusUpdate("ghost", last_seen=1.0, online=True)])
    await reg.close()
    reg = DeviceRegistry(path, durability="os")
    await reg.open()
    try:
        assert reg.unregistered == 1
        assert await reg.mark_all_offline("shutdown") == 2
        d = await reg.get("d1")
        assert d is not None and d.status == "offline" and d.disconnect_reason == "shutdown"
    finally:
        await reg.close()


async def test_status_counts_kept_by_triggers_match_a_real_count(registry: DeviceRegistry) -> None:
    """The per-status counts (what a status-only listing's total reads) follow
    every kind of write; checked against a count of the rows after each."""

    async def real() -> dict[str, int]:
        def read(c: object) -> dict[str, int]:
            rows = c.execute("SELECT status, count(*) FROM devices GROUP BY status")  # type: ignore[attr-defined]
            return {s: int(n) for s, n in rows}

        return await registry.db.read(read)  # type: ignore[arg-type]

    async def check() -> None:
        counts = {k: v for k, v in (await registry.counts()).items() if v}
        assert counts == await real()
        for status, n in (await registry.counts()).items():
            assert (await registry.list(DeviceFilter(status=status), limit=1)).total == n

    await registry.add_many([(2, {"id": "a"}), (3, {"id": "b"}), (4, {"id": "c"})])
    await check()
    await registry.record_status(
        [StatusUpdate("a", online=True, connected=True), StatusUpdate("x", last_seen=1.0)]
    )
    await check()
    await registry.disable("a")
    await registry.disable("b")
    await check()
    await registry.enable("a")
    await registry.add({"id": "x"})  # unregistered -> registered (and online: seen)
    await check()
    await registry.mark_idle(10.0)
    await check()
    await registry.mark_all_offline("shutdown")
    await registry.remove("c")
    await check()
    assert (await registry.list()).total == 3


async def test_export_defuses_spreadsheet_formulas_and_import_restores_them(
    registry: DeviceRegistry,
) -> None:
    await registry.add({"id": "d1", "name": "=HYPERLINK(1)", "type": "-meter"})
    await registry.record_status([StatusUpdate("d1", firmware="@SUM(A1)")])
    text = export_rows((await registry.list()).devices, header=True)
    row = text.splitlines()[1].split(",")
    assert row[1] == "'=HYPERLINK(1)" and row[2] == "'-meter" and row[6] == "'@SUM(A1)"
    ((_, fields),) = parse_csv(text.encode())
    assert fields["name"] == "=HYPERLINK(1)" and fields["type"] == "-meter"
    assert fields["firmware"] == "@SUM(A1)"


async def test_peer_text_is_kept_printable(registry: DeviceRegistry) -> None:
    from edgeway.devices.presence import DevicePresence
    from edgeway.reading import Origin, Reading

    presence = DevicePresence(registry)
    presence.seen_readings([Reading("d1", 1.0, {"firmware_version": "1.0\x1b[2J"}, Origin("mqtt"))])
    presence.poll_failed("d1", "opcua", "BadNode\x1b]0;pwned\x07", offline=True)
    await presence.flush()
    d = await registry.get("d1")
    assert d is not None and d.firmware is None  # not printable: not taken
    assert d.last_error == "BadNode?]0;pwned?"


async def test_lookups_do_not_wait_for_a_long_write(registry: DeviceRegistry) -> None:
    """A CONNECT's lookup and a listing read on their own connection: a flush
    or an import holding the writer for a while does not hold them up."""
    import threading
    import time

    await registry.add({"id": "d1"})
    release = threading.Event()

    def long_write(c: object) -> None:
        c.execute("UPDATE devices SET name = 'x' WHERE id = 'd1'")  # type: ignore[attr-defined]
        release.wait(5.0)  # a transaction that takes its time

    write = registry.db.write(long_write)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    flags = await asyncio.wait_for(registry.flags("d1"), 2.0)
    page = await asyncio.wait_for(registry.list(), 2.0)
    took = time.monotonic() - t0
    release.set()
    await write
    assert flags is not None and flags.enabled and [d.name for d in page.devices] == [""]
    assert took < 1.0
    assert (await registry.get("d1")).name == "x"  # type: ignore[union-attr]


async def test_lookups_of_one_loop_turn_share_one_query(registry: DeviceRegistry) -> None:
    """A connect storm's lookups (1,200 here, across several IN chunks) are
    answered right, with one read for the lot."""
    await registry.add_many([(i, {"id": f"dev-{i:04d}"}) for i in range(1000)])
    await registry.disable("dev-0007")
    registry._flags.clear()
    reads = 0
    real = registry._read

    def counting(fn):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return real(fn)

    registry._read = counting  # type: ignore[method-assign]
    ids = [f"dev-{i:04d}" for i in range(1200)]  # 200 unknown
    answers = await asyncio.gather(*(registry.flags(d) for d in ids), registry.flags("dev-0001"))
    assert reads == 1
    assert answers[7] is not None and not answers[7].enabled
    assert all(a is not None and a.enabled for i, a in enumerate(answers[:1000]) if i != 7)
    assert answers[1000:1200] == [None] * 200 and answers[-1] == answers[1]
