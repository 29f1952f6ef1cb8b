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


class AllocatedPeak:
    """Peak of the bytes malloc has handed out and not taken back (glibc ``mallinfo2``: in use in the
    heaps plus mmapped chunks), sampled by a thread every ``interval`` seconds between :meth:`start`
    and :meth:`stop`.

    The resident size also holds what the allocator keeps after a free (a CPU heap fragments: small
    long-lived objects, such as autograd's graph nodes, land between the freed activations); this is
    the CPU counterpart of CUDA's ``max_memory_allocated`` beside ``max_memory_reserved``. A short
    spike between two samples can be missed; both sides of a comparison are sampled alike.
    ``available`` is False off glibc (>= 2.33), and then every reading is 0.
    """

    def __init__(self, interval: float = 0.002):
        import ctypes
        import threading
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            info = type("MallInfo2", (ctypes.Structure,), {"_fields_": [
                (name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]})
            libc.mallinfo2.restype = info
            self._mallinfo = libc.mallinfo2
            self.available = True
        except (OSError, AttributeError):
            self._mallinfo, self.available = None, False

    def now(self) -> int:
        """Bytes malloc has handed out now (0 when not available)."""
        if self._mallinfo is None:
            return 0
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def start(self) -> int:
        import threading
        self.peak = self.now()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.peak

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.peak
