"""Detecting a cancellation that a protocol library swallowed.

Used by the reconnect loops of the Modbus, OPC-UA and serial adapters::

    except Exception as e:
        if cancel_requested():
            raise asyncio.CancelledError from e
        state.record_error(e)

Some libraries catch ``CancelledError`` inside a request and raise their own
error instead (pymodbus turns it into "No response received"). A reconnect
loop that catches ``Exception`` would then retry forever and never stop; the
task's pending cancel count tells the truth.
"""

from __future__ import annotations

import asyncio


def cancel_requested() -> bool:
    """True when the current task has a cancellation pending."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
