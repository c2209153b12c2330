"""Firmware images and campaigns: the store and the engine (docs/firmware.md).

Images live under ``DATA_DIR/firmware/`` (one file per image, streamed in,
never held in memory; :mod:`edgeway.storage.blobs`), their records and every
campaign with its per-device targets in ``firmware.db`` (SQLite through
:mod:`edgeway.storage.sqlite`). A campaign's progress is on disk before it is
acted on, so a restarted gateway resumes where it was.

A campaign goes through its waves in order: a **canary** share of all its
devices first, then each group. Within a wave the order is random (seeded by
the campaign id, so a restart keeps it). The engine (one task, a tick every
``TICK`` seconds) starts devices at most ``pace`` per minute and
``max_in_flight`` at once: each gets a ``firmware.update`` command (durable,
FIFO, over its own protocol, with the idempotency key
``fw:<campaign>:<device>`` so a device is never sent the same campaign twice).
The command's result ends the device's target: ``succeeded`` only when the
device reports result ``success`` **and** the image's version as its
firmware version (LwM2M Object 5's confirmation), else ``failed`` with the
LwM2M result code. A wave must finish with at least ``success_threshold`` of
its devices succeeded before the next starts; once ``min_finished`` devices
finished, a failure share above ``error_threshold`` halts the campaign. Pause
stops starting devices (those in flight finish); abort also cancels the
commands still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from edgeway.firmware.model import (
    Campaign,
    CampaignState,
    Image,
    Target,
    TargetState,
    UpdateResult,
)
from edgeway.signing import verify
from edgeway.storage.blobs import BlobError, receive, remove_parts
from edgeway.storage.sqlite import Database

if TYPE_CHECKING:
    from edgeway.commands.service import CommandService
    from edgeway.devices.registry import DeviceRegistry

log = logging.getLogger(__name__)

COMMAND = "firmware.update"
TICK = 0.5
SIGNATURE_CONTEXT = b"edgeway-firmware-v1:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

SCHEMA_V1 = """
CREATE TABLE images(
    id TEXT PRIMARY KEY, version TEXT NOT NULL, hardware TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, signed_by TEXT, created_at REAL NOT NULL, note TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX images_version ON images(hardware, version);
CREATE TABLE campaigns(
    id TEXT PRIMARY KEY, image_id TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
    params TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL
);
CREATE TABLE targets(
    campaign_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL, ord INTEGER NOT NULL,
    state TEXT NOT NULL, command_id TEXT, result INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL,
    PRIMARY KEY(campaign_id, device_id)
);
CREATE INDEX targets_order ON targets(campaign_id, wave, ord);
"""

_PARAMS = (
    "waves",
    "canary_share",
    "pace",
    "max_in_flight",
    "success_threshold",
    "error_threshold",
    "min_finished",
    "ttl",
    "selection",
    "counted_since",
)
USER_PARAMS = frozenset(_PARAMS[1:8])
"""What a campaign's creator sets; ``selection`` and ``counted_since`` are the
gateway's own."""
MAX_TARGETS = 100_000
"""Devices in one campaign: every target is a row read by each engine step."""


class FirmwareError(Exception):
    """A request refused: ``code`` says why (invalid, not_found, exists, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def signed_message(hardware: str, version: str, digest: bytes) -> bytes:
    """What an image's Ed25519 signature signs: the hardware type and the
    version are part of it, so a signed image cannot be passed off as another."""
    return SIGNATURE_CONTEXT + hardware.encode() + b":" + version.encode() + b":" + digest


def _image(row: Sequence[Any]) -> Image:
    return Image(*row)


def _campaign(row: Sequence[Any]) -> Campaign:
    params = orjson.loads(row[4])
    return Campaign(
        row[0], row[1], CampaignState(row[2]), row[3], reason=row[5], updated_at=row[6], **params
    )


def _target(row: Sequence[Any]) -> Target:
    return Target(
        row[0], row[1], row[2], row[3], TargetState(row[4]), row[5], row[6], row[7], row[8]
    )


class FirmwareService:
    """Images, campaigns and the engine that runs them."""

    def __init__(
        self,
        data_dir: Path | str,
        commands: CommandService,
        *,
        max_size: int,
        keys: Mapping[str, Any],
        require_signature: bool,
        download_base: str | None,
        durability: Literal["fsync", "os"] = "fsync",
    ) -> None:
        self.root = Path(data_dir) / "firmware"
        self.commands = commands
        self.max_size = max_size
        self.keys = dict(keys)
        self.require_signature = require_signature
        self.download_base = download_base
        self.db = Database(
            self.root / "firmware.db",
            migrations=[SCHEMA_V1],
            durability=durability,
            name="firmware",
        )
        self._task: asyncio.Task[None] | None = None
        self._budget: dict[str, float] = {}
        self._downloads: dict[str, set[str]] = {}
        """image id -> devices with an unfinished target (who may download it)."""
        self.started = 0
        self.registry: DeviceRegistry | None = None
        """The device registry, for campaigns that target its groups, tags
        and type (set by the gateway when ``devices`` is enabled)."""

    async def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        remove_parts(self.root)
        await self.db.open()
        await self._load_downloads()
        self._task = asyncio.create_task(self._run(), name="firmware campaigns")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.db.close()

    # -- images ------------------------------------------------------------

    def path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.bin"

    async def add_image(
        self,
        hardware: str,
        version: str,
        chunks: AsyncIterator[bytes],
        *,
        sha256: str | None = None,
        signature: bytes | None = None,
        note: str = "",
    ) -> Image:
        for what, value in (("hardware", hardware), ("version", version)):
            if not isinstance(value, str) or not NAME_RE.match(value):
                raise FirmwareError(
                    "invalid", f"{what}: 1-64 letters, digits, '.', '_', '+' or '-'"
                )
        if await self._image_by(hardware, version) is not None:
            raise FirmwareError("exists", f"image {hardware} {version} already exists")
        image_id = f"{hardware}-{version}-{uuid.uuid4().hex[:8]}"
        signer: list[str | None] = [None]

        def check(digest: bytes) -> None:
            signer[0] = self._verify(hardware, version, digest, signature)

        try:
            hexd, size = await receive(
                chunks, self.path(image_id), max_size=self.max_size, sha256=sha256, check=check,
                what="image",
            )  # fmt: skip
        except BlobError as e:
            raise FirmwareError(e.code, str(e)) from None
        image = Image(image_id, version, hardware, size, hexd, signer[0], time.time(), note[:500])

        def insert(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image.id,
                    version,
                    hardware,
                    size,
                    hexd,
                    image.signed_by,
                    image.created_at,
                    image.note,
                ),
            )

        try:
            await self.db.write(insert)
        except sqlite3.IntegrityError:
            self.path(image_id).unlink(missing_ok=True)
            raise FirmwareError("exists", f"image {hardware} {version} already exists") from None
        return image

    def _verify(
        self, hardware: str, version: str, digest: bytes, signature: bytes | None
    ) -> str | None:
        if signature is None:
            if self.require_signature:
                raise FirmwareError(
                    "unsigned", "firmware.require_signature is on: a signature is needed"
                )
            return None
        signer = verify(self.keys, signature, signed_message(hardware, version, digest))
        if signer is None:
            raise FirmwareError("bad_signature", "the signature matches none of firmware.keys")
        return signer

    async def _image_by(self, hardware: str, version: str) -> Image | None:
        row = await self.db.read(
            lambda c: c.execute(
                "SELECT * FROM images WHERE hardware = ? AND version = ?", (hardware, version)
            ).fetchone()
        )
        return None if row is None else _image(row)

    async def image(self, image_id: str) -> Image | None:
        row = await self.db.read(
            lambda c: c.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        )
        return None if row is None else _image(row)

    async def images(self) -> list[Image]:
        rows = await self.db.read(
            lambda c: c.execute("SELECT * FROM images ORDER BY created_at").fetchall()
        )
        return [_image(r) for r in rows]

    def may_download(self, image_id: str, device_id: str) -> bool:
        """Only a device whose update command for that image is out (its
        target ``sent``, whatever its campaign's state: those in flight finish)."""
        return device_id in self._downloads.get(image_id, ())

    # -- campaigns ---------------------------------------------------------

    async def select(
        self, groups: Sequence[str] = (), tags: Sequence[str] = (), type: str | None = None
    ) -> dict[str, list[str]]:
        """Waves from the device registry, resolved now: one per group in the
        order given (``groups`` empty: one wave, ``selected``), each with the
        registered, enabled devices of that group that have every tag of
        ``tags`` and, if given, the type ``type``. A device in two groups
        goes in the first."""
        from edgeway.devices.registry import DeviceFilter

        if self.registry is None:
            raise FirmwareError(
                "invalid",
                "targeting by group, tag or type needs the device registry (devices.enabled)",
            )
        if not groups and not tags and type is None:
            raise FirmwareError("invalid", "select devices by groups, tags or type")
        for what, values in (("groups", groups), ("tags", tags)):
            if not all(isinstance(v, str) and v for v in values):
                raise FirmwareError("invalid", f"{what}: a list of names")
        if type is not None and (not isinstance(type, str) or not type):
            raise FirmwareError("invalid", "type: a device type")
        want = set(tags)
        waves: dict[str, list[str]] = {}
        seen: set[str] = set()
        wave_groups: list[str | None] = [*groups] or [None]
        for group in wave_groups:
            flt = DeviceFilter(group=group, type=type, tag=tags[0] if tags else None)
            ids: list[str] = []
            after: str | None = None
            while True:
                page = await self.registry.list(flt, limit=1000, after=after)
                for d in page.devices:
                    if d.registered and d.enabled and want <= set(d.tags) and d.id not in seen:
                        seen.add(d.id)
                        ids.append(d.id)
                if len(seen) > MAX_TARGETS:
                    raise FirmwareError("invalid", f"over {MAX_TARGETS} devices in one campaign")
                if page.next_after is None:
                    break
                after = page.next_after
            waves[group if group is not None else "selected"] = ids
        return waves

    async def create(
        self,
        image_id: str,
        groups: Mapping[str, Sequence[str]],
        *,
        selection: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Campaign:
        """A campaign of ``image_id`` over ``groups`` (name -> device ids, in
        order); the canary wave takes ``canary_share`` of all devices.
        ``selection`` (what :meth:`select` was asked) is kept with it."""
        image = await self.image(image_id)
        if image is None:
            raise FirmwareError("not_found", f"no image {image_id!r}")
        unknown = set(params) - USER_PARAMS
        if unknown:
            raise FirmwareError("invalid", f"unknown parameters: {', '.join(sorted(unknown))}")
        devices: list[tuple[str, str]] = []
        seen: set[str] = set()
        for group, ids in groups.items():
            for d in ids:
                if not isinstance(d, str) or not d:
                    raise FirmwareError("invalid", f"group {group}: device ids are strings")
                if d not in seen:
                    seen.add(d)
                    devices.append((group, d))
        if not devices:
            raise FirmwareError("invalid", "a campaign needs devices")
        if len(devices) > MAX_TARGETS:
            raise FirmwareError("invalid", f"over {MAX_TARGETS} devices in one campaign")
        cid = uuid.uuid4().hex[:12]
        campaign = Campaign(
            cid, image_id, CampaignState.RUNNING, time.time(), ["canary", *groups],
            selection=dict(selection or {}), **params,
        )  # fmt: skip
        _check_params(campaign)
        rng = random.Random(cid)
        n_canary = (
            max(1, round(len(devices) * campaign.canary_share)) if campaign.canary_share else 0
        )
        canary = set(rng.sample([d for _, d in devices], min(n_canary, len(devices))))
        targets: list[Target] = []
        per_wave: dict[int, list[str]] = {}
        wave_of = {name: i for i, name in enumerate(campaign.waves)}
        for group, d in devices:
            per_wave.setdefault(0 if d in canary else wave_of[group], []).append(d)
        now = time.time()
        for w, ids in per_wave.items():
            rng.shuffle(ids)
            targets += [Target(cid, d, w, i, updated_at=now) for i, d in enumerate(ids)]

        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO campaigns VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    cid,
                    image_id,
                    campaign.state.value,
                    campaign.created_at,
                    _params(campaign),
                    "",
                    now,
                ),
            )
            c.executemany(
                "INSERT INTO targets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (cid, t.device_id, t.wave, t.order, t.state.value, None, 0, "", now)
                    for t in targets
                ],
            )

        await self.db.write(write)
        log.info("firmware campaign %s of %s: %d devices", cid, image_id, len(targets))
        return await self.campaign(cid)  # type: ignore[return-value]

    async def campaign(self, cid: str) -> Campaign | None:
        def read(c: sqlite3.Connection) -> tuple[Any, list[Any]]:
            row = c.execute("SELECT * FROM campaigns WHERE id = ?", (cid,)).fetchone()
            counts = c.execute(
                "SELECT state, COUNT(*) FROM targets WHERE campaign_id = ? GROUP BY state", (cid,)
            ).fetchall()
            return row, counts

        row, counts = await self.db.read(read)
        if row is None:
            return None
        camp = _campaign(row)
        camp.counts = {state: n for state, n in counts}
        return camp

    async def campaigns(self) -> list[Campaign]:
        ids = await self.db.read(
            lambda c: [r[0] for r in c.execute("SELECT id FROM campaigns ORDER BY created_at")]
        )
        return [c for cid in ids if (c := await self.campaign(cid)) is not None]

    async def targets(self, cid: str) -> list[Target]:
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT * FROM targets WHERE campaign_id = ? ORDER BY wave, ord", (cid,)
            ).fetchall()
        )
        return [_target(r) for r in rows]

    async def set_state(self, cid: str, action: Literal["pause", "resume", "abort"]) -> Campaign:
        camp = await self.campaign(cid)
        if camp is None:
            raise FirmwareError("not_found", f"no campaign {cid!r}")
        allowed = {
            "pause": {CampaignState.RUNNING},
            "resume": {CampaignState.PAUSED, CampaignState.HALTED},
            "abort": {CampaignState.RUNNING, CampaignState.PAUSED, CampaignState.HALTED},
        }[action]
        if camp.state not in allowed:
            raise FirmwareError("invalid", f"cannot {action} a {camp.state.value} campaign")
        new = {
            "pause": CampaignState.PAUSED,
            "resume": CampaignState.RUNNING,
            "abort": CampaignState.ABORTED,
        }[action]
        if action == "resume" and camp.state is CampaignState.HALTED:
            camp.counted_since = time.time()
            await self.db.write(
                lambda c: c.execute(
                    "UPDATE campaigns SET params = ? WHERE id = ?", (_params(camp), cid)
                )
            )
        await self._set(cid, new, "" if action == "resume" else f"{action} by an operator")
        if action == "abort":
            for t in await self.targets(cid):
                if t.state is TargetState.SENT and t.command_id is not None:
                    with contextlib.suppress(Exception):
                        await self.commands.cancel(t.command_id)
                if t.state in (TargetState.PENDING, TargetState.SENT):
                    await self._finish(
                        t, camp.image_id, TargetState.CANCELLED, 0, "campaign aborted"
                    )
        return await self.campaign(cid)  # type: ignore[return-value]

    async def _set(self, cid: str, state: CampaignState, reason: str) -> None:
        await self.db.write(
            lambda c: c.execute(
                "UPDATE campaigns SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (state.value, reason, time.time(), cid),
            )
        )
        log.info("firmware campaign %s: %s %s", cid, state.value, reason)

    # -- the engine --------------------------------------------------------

    async def _load_downloads(self) -> None:
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT c.image_id, t.device_id FROM targets t JOIN campaigns c ON c.id = t.campaign_id "
                "WHERE t.state = 'sent'"
            ).fetchall()
        )
        for image_id, device in rows:
            self._downloads.setdefault(image_id, set()).add(device)

    async def _run(self) -> None:
        while True:
            try:
                for camp in await self.campaigns():
                    if camp.state in (
                        CampaignState.RUNNING,
                        CampaignState.PAUSED,
                        CampaignState.HALTED,
                    ):
                        await self._step(camp)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("firmware campaigns: a step failed; trying again")
            await asyncio.sleep(TICK)

    async def _step(self, camp: Campaign) -> None:
        from edgeway.commands.model import CommandState

        targets = await self.targets(camp.id)
        image = await self.image(camp.image_id)
        # Results of the devices in flight (whatever the campaign's state).
        for t in targets:
            if t.state is not TargetState.SENT or t.command_id is None:
                continue
            cmd = await self.commands.get(t.command_id)
            if cmd is None:
                await self._finish(
                    t, camp.image_id, TargetState.FAILED, UpdateResult.UPDATE_FAILED, "command lost"
                )
            elif cmd.state is CommandState.SUCCEEDED:
                code, version = _outcome(cmd.result)
                if code is UpdateResult.SUCCESS and image is not None and version == image.version:
                    await self._finish(
                        t, camp.image_id, TargetState.SUCCEEDED, code, f"version {version}"
                    )
                elif code is UpdateResult.SUCCESS:
                    await self._finish(
                        t, camp.image_id, TargetState.FAILED, UpdateResult.UPDATE_FAILED,
                        f"reported version {version!r}, not {image.version if image else '?'}",
                    )  # fmt: skip
                else:
                    await self._finish(t, camp.image_id, TargetState.FAILED, code, code.label)
            elif cmd.state.terminal:
                code, _ = _outcome(cmd.result)
                if code in (UpdateResult.SUCCESS, UpdateResult.INITIAL):
                    code = UpdateResult.UPDATE_FAILED
                await self._finish(
                    t,
                    camp.image_id,
                    TargetState.FAILED,
                    code,
                    f"command {cmd.state.value}: {cmd.error or ''}",
                )
        if camp.state is not CampaignState.RUNNING or image is None:
            return
        since = camp.counted_since
        finished = [
            t
            for t in targets
            if t.state in (TargetState.SUCCEEDED, TargetState.FAILED) and t.updated_at >= since
        ]
        failed = sum(t.state is TargetState.FAILED for t in finished)
        if len(finished) >= camp.min_finished and failed / len(finished) > camp.error_threshold:
            await self._set(
                camp.id, CampaignState.HALTED,
                f"{failed} of {len(finished)} finished devices failed (error_threshold {camp.error_threshold})",
            )  # fmt: skip
            return
        waves = sorted({t.wave for t in targets})
        current = next(
            (
                w
                for w in waves
                if any(
                    t.wave == w and t.state in (TargetState.PENDING, TargetState.SENT)
                    for t in targets
                )
            ),
            None,
        )
        if current is None:
            # Each finished target already took its device off the image's
            # downloaders; another campaign of the same image keeps its own.
            await self._set(camp.id, CampaignState.COMPLETED, "")
            return
        # A wave starts only when the waves before it met the success threshold.
        for w in waves:
            if w >= current:
                break
            done = [
                t
                for t in targets
                if t.wave == w
                and t.state in (TargetState.SUCCEEDED, TargetState.FAILED)
                and t.updated_at >= since
            ]
            ok = sum(t.state is TargetState.SUCCEEDED for t in done)
            if done and ok / len(done) < camp.success_threshold:
                await self._set(
                    camp.id, CampaignState.HALTED,
                    f"wave {camp.waves[w]}: {ok} of {len(done)} succeeded (success_threshold {camp.success_threshold})",
                )  # fmt: skip
                return
        in_flight = sum(t.state is TargetState.SENT for t in targets)
        budget = min(
            self._budget.get(camp.id, 1.0) + camp.pace / 60.0 * TICK, max(1.0, camp.pace / 60.0)
        )
        for t in targets:
            if budget < 1.0 or in_flight >= camp.max_in_flight:
                break
            if t.wave != current or t.state is not TargetState.PENDING:
                continue
            await self._send(camp, image, t)
            budget -= 1.0
            in_flight += 1
        self._budget[camp.id] = budget

    async def _send(self, camp: Campaign, image: Image, t: Target) -> None:
        params = {
            "campaign": camp.id,
            "image": image.id,
            "version": image.version,
            "hardware": image.hardware,
            "size": image.size,
            "sha256": image.sha256,
            "url": (
                f"{self.download_base.rstrip('/')}/devices/{t.device_id}/firmware/{image.id}"
                if self.download_base
                else None
            ),
        }
        allowed = self._downloads.setdefault(image.id, set())
        allowed.add(t.device_id)  # before the command: a device may download at once
        try:
            cmd, _ = await self.commands.submit(
                t.device_id,
                COMMAND,
                params,
                ttl=camp.ttl,
                result_timeout=camp.ttl,
                idempotency_key=f"fw:{camp.id}:{t.device_id}",
                source=f"firmware:{camp.id}",
            )
        except BaseException:
            allowed.discard(t.device_id)
            raise
        now = time.time()
        await self.db.write(
            lambda c: c.execute(
                "UPDATE targets SET state = 'sent', command_id = ?, updated_at = ? "
                "WHERE campaign_id = ? AND device_id = ?",
                (cmd.id, now, camp.id, t.device_id),
            )
        )
        self.started += 1

    async def _finish(
        self, t: Target, image_id: str, state: TargetState, result: int, detail: str
    ) -> None:
        """End ``t`` (on disk, then in ``t`` itself, so the caller's list of
        targets stays current without reading it again)."""
        now = time.time()
        await self.db.write(
            lambda c: c.execute(
                "UPDATE targets SET state = ?, result = ?, detail = ?, updated_at = ? "
                "WHERE campaign_id = ? AND device_id = ?",
                (state.value, int(result), detail[:500], now, t.campaign_id, t.device_id),
            )
        )
        t.state, t.result, t.detail, t.updated_at = state, int(result), detail[:500], now
        self._downloads.get(image_id, set()).discard(t.device_id)


def _outcome(result: Any) -> tuple[UpdateResult, str | None]:
    """(LwM2M result, reported firmware version) from a device's command result."""
    if not isinstance(result, dict):
        return UpdateResult.INITIAL, None
    version = result.get("version")
    return UpdateResult.parse(result.get("result", 0)), version if isinstance(
        version, str
    ) else None


def _params(c: Campaign) -> str:
    return orjson.dumps({k: getattr(c, k) for k in _PARAMS}).decode()


def _check_params(c: Campaign) -> None:
    if not 0.0 <= c.canary_share <= 1.0:
        raise FirmwareError("invalid", "canary_share is between 0 and 1")
    if not 0.0 < c.pace <= 100_000:
        raise FirmwareError("invalid", "pace is devices per minute, above 0")
    if not 1 <= c.max_in_flight <= 100_000:
        raise FirmwareError("invalid", "max_in_flight is 1 or more")
    for name in ("success_threshold", "error_threshold"):
        if not 0.0 <= getattr(c, name) <= 1.0:
            raise FirmwareError("invalid", f"{name} is between 0 and 1")
    if c.ttl <= 0:
        raise FirmwareError("invalid", "ttl is above 0")
