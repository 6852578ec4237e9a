"""Model folders in the user cache: a conversion finished by another process first is kept."""
import pytest

from sgpo.models.loading import _publish


def test_a_conversion_another_process_finished_first_is_kept_and_this_copy_deleted(tmp_path):
    """Processes of one run (or test workers) converting the same embedded model at once: the first folder moved into
    place wins, the later one is not an error and leaves nothing behind; a failed move with no model there still is."""
    out = tmp_path / "model"
    for pid in (1, 2):
        tmp = tmp_path / f"model.tmp{pid}"
        tmp.mkdir()
        (tmp / "config.json").write_text(f'{{"pid": {pid}}}')
        assert _publish(tmp, out) == out and not tmp.exists()
    assert (out / "config.json").read_text() == '{"pid": 1}'
    with pytest.raises(OSError):
        _publish(tmp_path / "missing.tmp3", tmp_path / "other")
