"""Helpers shared by the benchmark scripts: offline environment, import path, peak-RSS sampling, summary figures."""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_env() -> None:
    """Offline hub access, quiet progress bars, and ``sgpo`` importable from a source checkout."""
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import sgpo  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the process peak so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def process_peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class PeakRSS:
    """Samples the RSS in a background thread while the ``with`` block runs; ``.peak`` is the largest sample (bytes).

    One process can then report a peak per stage (``ru_maxrss`` only knows the whole process).
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


class Timer:
    """Wall-clock seconds, and CPU seconds of this process (all its threads) over the block."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0
        return False


def mmm(values: list[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def fmt_mmm(values: list[float], digits: int = 2) -> str:
    lo, med, hi = mmm(values)
    return f"{lo:.{digits}f} / {med:.{digits}f} / {hi:.{digits}f}"


def gb(n: int | float) -> float:
    return n / 1024 ** 3
