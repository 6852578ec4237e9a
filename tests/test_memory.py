"""Memory helpers: training maps its large buffers on their own and leaves glibc with a threshold at which the heap
serves generation's buffers again (the peak and speed effects are measured by benchmarks/training_memory.py)."""
import ctypes

import pytest

from sgpo import models


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_training_buffers_are_mapped_and_the_threshold_is_raised_after(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    with models.mapped_buffers():
        assert libc.calls == [(-3, models.MAPPED_THRESHOLD)]  # M_MMAP_THRESHOLD while training
    assert libc.calls[1:] == [(-3, 32 << 20), (-1, 64 << 20)]  # glibc's upper values afterwards
    libc.calls.clear()
    with pytest.raises(RuntimeError):
        with models.mapped_buffers():
            raise RuntimeError("a failed training step")
    assert libc.calls[-2:] == [(-3, 32 << 20), (-1, 64 << 20)]  # restored on failure too


def test_without_glibc_nothing_is_set(monkeypatch):
    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", missing)
    with models.mapped_buffers():
        pass
