"""The fault-injection suite (CI-sized; bench/faults.py runs the long versions).

Its helpers live beside the integration tests' (``edgeway_process``,
``mosquitto_process``, ``mqtt_peers``); this puts them on the import path.
"""

from __future__ import annotations

import sys
from pathlib import Path

_INTEGRATION = str(Path(__file__).resolve().parents[1] / "integration")
if _INTEGRATION not in sys.path:
    sys.path.insert(0, _INTEGRATION)
