"""Peak resident memory of this process, per phase (Linux).

    reset_peak_rss()          # the kernel's high-water mark starts again from the current RSS
    ...                       # a stage runs
    peak_rss_bytes()          # the highest RSS since the reset, in bytes

``reset_peak_rss`` writes "5" to ``/proc/self/clear_refs`` (Linux >= 4.0), which resets VmHWM;
``peak_rss_bytes`` reads VmHWM from ``/proc/self/status``. Elsewhere (or where /proc is read-only)
the reset does nothing and the peak falls back to ``resource.getrusage``'s ru_maxrss, which is the
peak of the whole process so far (``reset_peak_rss`` returns False then).
"""
from __future__ import annotations

import re
import resource
import sys

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)


def reset_peak_rss() -> bool:
    """Start a new peak from the current RSS; False when the platform cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Highest resident set size since the last :func:`reset_peak_rss` (or process start)."""
    try:
        with open("/proc/self/status") as f:
            m = _HWM.search(f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)  # macOS reports bytes, Linux kB
