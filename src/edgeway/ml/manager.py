"""Loaded models, the inference thread, candidates, budgets and automatic rollback.

Inference never runs on the event loop: ``model`` steps hand feature rows to
:meth:`ModelManager.submit`, which puts them on a bounded queue (``models.queue``
jobs) read by one worker thread. A full queue refuses the job at once and the
step counts it (``dropped``): backpressure sheds inference, never telemetry,
and never blocks the broker. The worker runs the active version on every row
and, when a candidate is set, the candidate too:

- ``shadow``: the candidate's outputs are only compared with the active one's
  (mean and largest absolute difference, share within ``models.agree_within``);
  they never leave the manager, so a shadow model cannot raise an alarm;
- ``canary``: for devices whose stable hash falls in the candidate's ``share``,
  the candidate's outputs are the ones emitted (tagged with its version).

Budgets, judged per version over its last ``models.window`` calls once it made
``models.min_calls``: a call that raised or produced a NaN/infinite output is
an error; the error rate must stay under ``models.max_error_rate`` and the p99
call latency under ``models.max_latency``. A version over budget is taken out
of service by the worker at once (no further outputs from it), and the loop
then persists the consequence: an active version is rolled back to the
previous one (or, with none, the model goes silent and says why in status); a
candidate is dropped. A version that fails to load is never made active.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from edgeway.ml.store import CandidateMode, ModelError, ModelStore, Slots, check_name

if TYPE_CHECKING:
    import numpy as np

    from edgeway.ml.config import ModelsSection

log = logging.getLogger(__name__)

Outputs = dict[str, list[list[float]]]
"""Per output name, one row of floats per input row."""


def _import_runtime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ModelError(
            "unavailable", f"onnxruntime is not installed ({e}); install edgeway[ml]"
        ) from None
    return onnxruntime


def device_bucket(device_id: str) -> float:
    """A stable number in [0, 1) per device: who is in a canary share."""
    return (zlib.crc32(device_id.encode()) & 0xFFFFFFFF) / 2**32


@dataclass(slots=True)
class VersionStats:
    """What one loaded version did (the status and the budgets read it)."""

    calls: int = 0
    rows: int = 0
    errors: int = 0
    nan_outputs: int = 0
    window: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=200))
    """(latency seconds, failed) of the last calls."""
    out_of_service: str | None = None

    def p(self, q: float) -> float | None:
        lat = sorted(x for x, _ in self.window)
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    def to_json(self) -> dict[str, Any]:
        p50, p99 = self.p(0.5), self.p(0.99)
        return {
            "calls": self.calls,
            "rows": self.rows,
            "errors": self.errors,
            "nan_outputs": self.nan_outputs,
            "latency_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "latency_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "out_of_service": self.out_of_service,
        }


class Runner:
    """One loaded version: an onnxruntime session and its figures."""

    def __init__(self, name: str, version: str, path: str, window: int) -> None:
        ort = _import_runtime()
        opts = ort.SessionOptions()
        # One thread: the gateway has other work, and a small model gains
        # nothing from a pool (measured in bench/ml.py).
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                path, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ModelError("load_failed", f"model {name} {version} does not load: {e}") from None
        self.name = name
        self.version = version
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(
                "load_failed", f"model {name} {version} has {len(inputs)} inputs; one is supported"
            )
        self.input = inputs[0].name
        shape = inputs[0].shape
        self.width = shape[-1] if shape and isinstance(shape[-1], int) else None
        self.batched = bool(shape) and not isinstance(shape[0], int)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.stats = VersionStats(window=deque(maxlen=window))

    def run(self, rows: np.ndarray) -> Outputs:
        """Outputs per row (as lists of floats), measuring the call."""
        import numpy as np

        t0 = time.perf_counter()
        failed = True
        try:
            if self.batched:
                results = self.session.run(None, {self.input: rows})
            else:
                parts = [
                    self.session.run(None, {self.input: rows[i : i + 1]}) for i in range(len(rows))
                ]
                results = [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]
            out: Outputs = {}
            nan = False
            for oname, arr in zip(self.outputs, results, strict=True):
                a = np.asarray(arr, dtype=np.float64).reshape(len(rows), -1)
                if not np.isfinite(a).all():
                    nan = True
                out[oname] = a.tolist()
            if nan:
                self.stats.nan_outputs += 1
                raise FloatingPointError("the model produced NaN or infinite outputs")
            failed = False
            return out
        finally:
            s = self.stats
            s.calls += 1
            s.rows += len(rows)
            s.errors += failed
            s.window.append((time.perf_counter() - t0, failed))


@dataclass(slots=True)
class Job:
    """Rows for one model from one step's batch; ``deliver`` gets the results."""

    model: str
    device_ids: list[str]
    rows: list[list[float]]
    deliver: Callable[[list[tuple[str, Outputs | None]]], None]
    """Called on the event loop with, per row, (version used, outputs or None)."""


@dataclass(slots=True)
class Comparison:
    """Shadow figures: the candidate's outputs against the active one's."""

    rows: int = 0
    sum_abs_diff: float = 0.0
    max_abs_diff: float = 0.0
    within: int = 0

    def add(self, a: Outputs, b: Outputs, tolerance: float) -> None:
        for key, rows_a in a.items():
            rows_b = b.get(key)
            if rows_b is None:
                continue
            for ra, rb in zip(rows_a, rows_b, strict=False):
                d = max((abs(x - y) for x, y in zip(ra, rb, strict=False)), default=0.0)
                self.rows += 1
                self.sum_abs_diff += d
                self.max_abs_diff = max(self.max_abs_diff, d)
                self.within += d <= tolerance

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "mean_abs_diff": round(self.sum_abs_diff / self.rows, 6) if self.rows else None,
            "max_abs_diff": round(self.max_abs_diff, 6),
            "agreement": round(self.within / self.rows, 4) if self.rows else None,
        }


@dataclass(slots=True)
class _Live:
    """What the worker reads for one model: replaced whole, never mutated."""

    active: Runner | None
    candidate: Runner | None
    mode: CandidateMode | None
    share: float


class ModelManager:
    """Every model's loaded versions and the one inference thread."""

    def __init__(self, store: ModelStore, config: ModelsSection) -> None:
        self.store = store
        self.config = config
        self._slots: dict[str, Slots] = {}
        self._live: dict[str, _Live] = {}
        self._compare: dict[str, Comparison] = {}
        self._silent: dict[str, str] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.queue)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._judging: set[tuple[str, str]] = set()
        self.dropped = 0
        self.jobs = 0

    # -- lifetime -------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.store.open()
        self._slots = await self.store.all_slots()
        for name in list(self._slots):
            await self._load_slots(name, by="startup")
        self._thread = threading.Thread(target=self._work, name="ml-inference", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                # Make room for the stop marker: pending jobs are derived data.
                while True:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break
                self._queue.put_nowait(None)
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None
        await self.store.close()

    # -- the step's side ------------------------------------------------------

    def knows(self, name: str) -> bool:
        live = self._live.get(name)
        return live is not None and live.active is not None

    def submit(self, job: Job) -> bool:
        """Queue ``job`` for the inference thread; False (counted) when full."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            import numpy as np  # here, not at start: a gateway without models never loads it

            self.jobs += 1
            live = self._live.get(job.model)
            results: list[tuple[str, Outputs | None]] = [("", None)] * len(job.rows)
            if live is not None and live.active is not None:
                rows = np.asarray(job.rows, dtype=np.float32)
                active_out = self._call(job.model, live.active, rows)
                cand_out = None
                if live.candidate is not None:
                    cand_out = self._call(job.model, live.candidate, rows)
                for i, device in enumerate(job.device_ids):
                    use_candidate = (
                        cand_out is not None
                        and live.mode == "canary"
                        and device_bucket(device) < live.share
                    )
                    if use_candidate:
                        assert live.candidate is not None and cand_out is not None
                        results[i] = (live.candidate.version, _row(cand_out, i))
                    elif active_out is not None:
                        results[i] = (live.active.version, _row(active_out, i))
                if live.mode == "shadow" and cand_out is not None and active_out is not None:
                    cmp = self._compare.setdefault(job.model, Comparison())
                    cmp.add(active_out, cand_out, self.config.agree_within)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(job.deliver, results)

    def _call(self, model: str, runner: Runner, rows: np.ndarray) -> Outputs | None:
        if runner.stats.out_of_service is not None:
            return None
        try:
            out: Outputs | None = runner.run(rows)
        except Exception as e:
            out = None
            if runner.stats.errors <= 3 or runner.stats.errors % 1000 == 0:
                log.warning("model %s %s failed: %s", model, runner.version, e)
        reason = self._over_budget(runner)
        if reason is not None:
            runner.stats.out_of_service = reason
            out = None
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._judge, model, runner.version, reason)
        return out

    def _over_budget(self, runner: Runner) -> str | None:
        s = runner.stats
        cfg = self.config
        if len(s.window) < cfg.min_calls:
            return None
        failed = sum(1 for _, f in s.window if f)
        rate = failed / len(s.window)
        if rate > cfg.max_error_rate:
            what = "NaN or infinite outputs" if s.nan_outputs else "errors"
            return f"error rate {rate:.0%} over models.max_error_rate ({what})"
        p99 = s.p(0.99)
        if p99 is not None and p99 > cfg.max_latency:
            return (
                f"p99 latency {p99 * 1000:.1f} ms over models.max_latency "
                f"({cfg.max_latency * 1000:.1f} ms)"
            )
        return None

    def _judge(self, model: str, version: str, reason: str) -> None:
        key = (model, version)
        if key in self._judging:
            return
        self._judging.add(key)
        task = asyncio.ensure_future(self._take_out(model, version, reason))
        task.add_done_callback(lambda _t: self._judging.discard(key))

    async def _take_out(self, model: str, version: str, reason: str) -> None:
        cur = self._slots.get(model)
        if cur is None:
            return
        new = replace(cur)
        if cur.candidate == version:
            log.error("model %s: candidate %s dropped: %s", model, version, reason)
            new.candidate, new.mode, new.share = None, None, 0.0
            await self._apply(
                new, "candidate_failed", "guard", reason, version, (version, "failed")
            )
        elif cur.active == version and cur.previous is not None:
            log.error(
                "model %s: version %s rolled back to %s: %s", model, version, cur.previous, reason
            )
            new.active, new.previous = cur.previous, None
            await self._apply(new, "rolled_back", "guard", reason, version, (version, "failed"))
        elif cur.active == version:
            log.error(
                "model %s: version %s out of service and no previous version to return to: %s",
                model,
                version,
                reason,
            )
            self._silent[model] = f"{version}: {reason}"
            await self.store.save_slots(
                cur,
                what="out_of_service",
                by="guard",
                detail=reason,
                version=version,
                mark=(version, "failed"),
            )

    # -- lifecycle --------------------------------------------------------------

    async def _load(self, name: str, version: str) -> Runner:
        record = await self.store.get(name, version)
        if record is None:
            raise ModelError("not_found", f"no model {name} version {version}")
        path = str(self.store.path(name, version))
        return await asyncio.to_thread(Runner, name, version, path, self.config.window)

    async def _runners(self, slots: Slots) -> _Live:
        """Load what ``slots`` names (raises ModelError for one that does not load)."""
        live = self._live.get(slots.name)

        async def get(version: str | None) -> Runner | None:
            if version is None:
                return None
            for runner in (live.active, live.candidate) if live is not None else ():
                if (
                    runner is not None
                    and runner.version == version
                    and runner.stats.out_of_service is None
                ):
                    return runner  # keep its figures
            return await self._load(slots.name, version)

        return _Live(await get(slots.active), await get(slots.candidate), slots.mode, slots.share)

    async def _apply(
        self,
        new: Slots,
        what: str,
        by: str,
        detail: str,
        version: str | None,
        mark: tuple[str, str] | None = None,
    ) -> Slots:
        """Load, persist, then publish ``new`` to the worker (in that order:
        status never names a version the worker does not run)."""
        live = await self._runners(new)
        await self.store.save_slots(
            new, what=what, by=by, detail=detail, version=version, mark=mark
        )
        old = self._slots.get(new.name)
        if old is None or (old.candidate, old.active) != (new.candidate, new.active):
            self._compare.pop(new.name, None)  # the comparison was of another pair
        self._slots[new.name] = new
        self._live[new.name] = live
        if live.active is not None:
            self._silent.pop(new.name, None)
        return new

    async def _load_slots(self, name: str, *, by: str) -> None:
        """At start: load what was stored, stepping back over versions that no
        longer load (a rollback to the previous, a candidate dropped). Each
        version is loaded once; the runners loaded here are the ones used."""
        slots = self._slots[name]
        candidate: Runner | None = None
        if slots.candidate is not None:
            try:
                candidate = await self._load(name, slots.candidate)
            except ModelError as e:
                log.error("model %s: candidate %s: %s", name, slots.candidate, e)
                failed = slots.candidate
                slots = replace(slots, candidate=None, mode=None, share=0.0)
                await self._record(slots, "candidate_failed", by, e, failed)
        active: Runner | None = None
        while slots.active is not None:
            try:
                active = await self._load(name, slots.active)
                break
            except ModelError as e:
                log.error("model %s: active version %s: %s", name, slots.active, e)
                failed = slots.active
                if slots.previous is None:
                    self._silent[name] = str(e)
                    slots = replace(slots, active=None)
                else:
                    slots = replace(slots, active=slots.previous, previous=None)
                await self._record(slots, "rolled_back", by, e, failed)
        self._slots[name] = slots
        self._live[name] = _Live(active, candidate, slots.mode, slots.share)

    async def _record(
        self, slots: Slots, what: str, by: str, error: ModelError, failed: str
    ) -> None:
        await self.store.save_slots(
            slots, what=what, by=by, detail=str(error), version=failed, mark=(failed, "failed")
        )

    def _current(self, name: str) -> Slots:
        check_name("model name", name)
        return replace(self._slots.get(name) or Slots(name))

    async def activate(self, name: str, version: str, *, by: str) -> Slots:
        """Make ``version`` active (after it loads); the old active becomes previous."""
        new = self._current(name)
        if new.active == version:
            return new
        new.previous, new.active = new.active, version
        if new.candidate == version:
            new.candidate, new.mode, new.share = None, None, 0.0
        return await self._apply(new, "activated", by, "", version, (version, "ready"))

    async def set_candidate(
        self, name: str, version: str, mode: CandidateMode, *, share: float = 0.0, by: str
    ) -> Slots:
        if mode not in ("shadow", "canary"):
            raise ModelError("invalid", "mode must be shadow or canary")
        if mode == "canary" and not 0.0 < share <= 1.0:
            raise ModelError("invalid", "a canary share is above 0 and at most 1")
        new = self._current(name)
        if new.active is None:
            raise ModelError("invalid", f"model {name} has no active version to compare with")
        if new.active == version:
            raise ModelError("invalid", f"version {version} is already active")
        new.candidate, new.mode = version, mode
        new.share = share if mode == "canary" else 0.0
        detail = mode if mode == "shadow" else f"canary {share:.0%}"
        return await self._apply(new, "candidate", by, detail, version, (version, "ready"))

    async def promote(self, name: str, *, by: str) -> Slots:
        new = self._current(name)
        if new.candidate is None:
            raise ModelError("invalid", f"model {name} has no candidate to promote")
        version = new.candidate
        new.candidate, new.mode, new.share = None, None, 0.0
        new.previous, new.active = new.active, version
        return await self._apply(new, "promoted", by, "", version)

    async def rollback(self, name: str, *, by: str, reason: str = "") -> Slots:
        new = self._current(name)
        if new.previous is None:
            raise ModelError("invalid", f"model {name} has no previous version")
        failed = new.active
        new.active, new.previous = new.previous, None
        mark = None if failed is None else (failed, "rolled_back")
        return await self._apply(new, "rolled_back", by, reason, failed, mark)

    async def clear_candidate(self, name: str, *, by: str) -> Slots:
        new = self._current(name)
        version = new.candidate
        new.candidate, new.mode, new.share = None, None, 0.0
        return await self._apply(new, "candidate_cleared", by, "", version)

    # -- figures -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for name, slots in sorted(self._slots.items()):
            live = self._live.get(name)
            entry: dict[str, Any] = slots.to_json()
            for role in ("active", "candidate"):
                runner = getattr(live, role, None) if live is not None else None
                entry[f"{role}_stats"] = runner.stats.to_json() if runner is not None else None
            cmp = self._compare.get(name)
            entry["shadow"] = cmp.to_json() if cmp is not None else None
            entry["silent"] = self._silent.get(name)
            models[name] = entry
        return {
            "models": models,
            "queue": self._queue.qsize(),
            "queue_max": self.config.queue,
            "jobs": self.jobs,
            "dropped": self.dropped,
        }


def _row(out: Outputs, i: int) -> Outputs:
    return {k: [v[i]] for k, v in out.items()}
