"""Peak resident memory of this process, with a reset, for side-by-side memory measurements.

Linux keeps the peak resident set size (VmHWM); writing "5" to /proc/self/clear_refs resets it to
the current size, so the peak of one phase (a load, a forward) can be read on its own.
"""

import gc
import json
import subprocess
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> int:
    """Resets the peak to the current resident size and returns that size in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return rss_bytes()


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def run_case(script: str, *args: str) -> dict:
    """Runs ``script --case ARGS`` in a fresh Python process and returns the JSON object it prints
    last (each memory case gets a process of its own, so peaks do not mix)."""
    out = subprocess.run([sys.executable, script, "--case", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
