"""Where a run's time goes: wall seconds per stage and phase — generation, judging, training, reference_pass,
loading (models and judges), saving (checkpoints), converting (an embedded model, once) — counted exclusively (a phase
inside another pauses it), so a stage's phases and its ``other`` add up to its wall time. Every stage's metrics get
``time/<stage>/<phase>_s``; the run's log ends with the totals (``recipe.finish``).

The hooks (``@phase("generation")`` on a function, or ``with phase(...):``) sit in the parts that do the work
(rollouts, judges, the trainer, the policy's loads and saves), so a new stage is profiled without doing anything.

Memory: the process's peak RSS is read whenever a phase starts or ends; a rise is put down to the phase that was
running (``other`` between phases). Each stage's metrics get ``memory/<stage>/peak_rss_gb`` (the process's peak so
far) and the log names the stage and phase where the run's peak was reached. ``reset`` starts both afresh for the next
run of the same process (``sgpo compare`` runs every run in one process; on Linux the kernel's peak is reset too).
"""
from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

PHASES = ("generation", "judging", "training", "reference_pass", "loading", "saving", "converting")


class Profile:
    def __init__(self):
        self.reset(kernel=False)

    def reset(self, kernel: bool = True) -> None:
        """Forget every stage's seconds and the peak: a new run begins in this process. With ``kernel``, the process's
        peak RSS restarts from its current RSS (Linux: ``/proc/self/clear_refs``; elsewhere the peak stays the
        process's)."""
        self.stage = "setup"
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self._stack: list[list] = []  # [phase, since] of the phases running, innermost last
        self.peak_bytes, self.peak_at = 0, ""
        if kernel:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def note_peak(self, running: str) -> None:
        """Read the process's peak RSS; a rise since the last reading was reached in ``running`` (of this stage)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        if peak > self.peak_bytes:
            self.peak_bytes, self.peak_at = peak, f"{self.stage}/{running}"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.note_peak(self._stack[-1][0] if self._stack else "other")
        now = time.perf_counter()
        if self._stack:  # the outer phase pauses
            outer = self._stack[-1]
            self.seconds[(self.stage, outer[0])] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            _, since = self._stack.pop()
            self.seconds[(self.stage, name)] += now - since
            self.note_peak(name)
            if self._stack:
                self._stack[-1][1] = now

    def of(self, stage: str, total: float | None = None) -> dict:
        """``time/<stage>/<phase>_s`` of ``stage``; with its wall ``total``, ``other`` too (what no phase covers)."""
        out = {f"time/{stage}/{p}_s": round(s, 2) for (st, p), s in sorted(self.seconds.items()) if st == stage}
        if total is not None:
            out[f"time/{stage}/other_s"] = round(max(0.0, total - sum(out.values())), 2)
        self.note_peak("other")
        out[f"memory/{stage}/peak_rss_gb"] = round(self.peak_bytes / 1e9, 2)
        return out


PROFILE = Profile()


def phase(name: str):
    """``with phase("generation"): ...`` (or ``@phase("generation")`` on a function) counts the block's wall time to
    the running stage's phase ``name``."""
    return PROFILE.phase(name)


def totals(metrics_by_stage: dict[str, dict]) -> dict[str, float]:
    """Seconds per phase over a run's stages, from their metrics (resumed stages included), largest first."""
    out: dict[str, float] = defaultdict(float)
    for stage, m in metrics_by_stage.items():
        prefix = f"time/{stage}/"
        for k, v in m.items():
            if k.startswith(prefix) and k.endswith("_s"):
                out[k[len(prefix):-2]] += v
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
