"""Session-wide test setup: telemetry off, small thread counts for a 2-core machine."""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
