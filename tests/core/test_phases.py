"""The per-stage, per-phase profile: a phase inside another pauses it, so the phases and ``other`` add up to the
stage's wall time (a fake clock: no timing is asserted)."""
from sgpo.core import phases as profile


def test_phases_are_counted_exclusively_and_add_up_with_other(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(profile.time, "perf_counter", lambda: now[0])
    p = profile.Profile()
    p.stage = "round_1"
    with p.phase("training"):
        now[0] += 3
        with p.phase("saving"):  # a checkpoint inside training: saving's, not training's
            now[0] += 2
        now[0] += 1
    with p.phase("generation"):
        now[0] += 4
    p.stage = "test"
    with p.phase("judging"):
        now[0] += 5
    got = p.of("round_1", total=12.0)
    assert got.pop("memory/round_1/peak_rss_gb") > 0
    assert got == {"time/round_1/training_s": 4.0, "time/round_1/saving_s": 2.0, "time/round_1/generation_s": 4.0,
                   "time/round_1/other_s": 2.0}
    test = {k: v for k, v in p.of("test").items() if k.startswith("time/")}
    assert profile.totals({"round_1": got, "test": test}) == {"judging": 5.0, "training": 4.0,
                                                                       "generation": 4.0, "saving": 2.0, "other": 2.0}


def test_the_peak_memory_is_put_down_to_the_phase_that_reached_it(monkeypatch):
    class Usage:
        ru_maxrss = 0

    monkeypatch.setattr(profile.resource, "getrusage", lambda who: Usage)
    p = profile.Profile()
    p.stage = "round_1"
    Usage.ru_maxrss = 1_000_000  # KiB: reached before any phase
    with p.phase("generation"):
        Usage.ru_maxrss = 3_000_000
    with p.phase("training"):
        with p.phase("saving"):
            Usage.ru_maxrss = 2_000_000  # lower than the peak: a process's peak never falls, but no new peak
        Usage.ru_maxrss = 3_500_000  # reached in training, after the checkpoint
    p.stage = "test"
    with p.phase("judging"):
        pass
    assert p.peak_at == "round_1/training" and p.peak_bytes == 3_500_000 * 1024
    assert p.of("test")["memory/test/peak_rss_gb"] == 3.58


def test_a_reset_starts_the_next_run_of_the_process_afresh(monkeypatch):
    """``sgpo compare`` runs every run in one process: no run may count an earlier one's seconds or peak."""
    now = [0.0]
    monkeypatch.setattr(profile.time, "perf_counter", lambda: now[0])
    p = profile.Profile()
    p.stage = "test"
    big = bytearray(300_000_000)
    big[::4096] = b"\1" * len(big[::4096])  # touched: resident
    with p.phase("generation"):
        now[0] += 7
    before = p.peak_bytes
    del big
    p.reset()
    p.stage = "test"
    with p.phase("generation"):
        now[0] += 2
    got = p.of("test", total=2.0)
    assert got["time/test/generation_s"] == 2.0 and p.peak_at.startswith("test/")
    assert got["memory/test/peak_rss_gb"] * 1e9 < before - 200_000_000  # the 300 MB held before: not this run's
