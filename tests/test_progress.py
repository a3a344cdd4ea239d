"""The progress line's numbers: images/s per window and the ETA, for a fresh and a resumed run."""

import io

from scadfast import progress as progress_lib


def _clocked(monkeypatch, times):
    it = iter(times)
    monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: next(it))


def test_images_per_second_counts_only_the_window(monkeypatch):
    _clocked(monkeypatch, [0.0, 10.0, 30.0])
    p = progress_lib.Progress(100, stream=io.StringIO())
    assert p.log(10, 160, {})["images_per_s"] == 16.0
    assert p.log(20, 480, {})["images_per_s"] == 16.0  # 320 images in 20 s


def test_resumed_run_reports_its_own_images_per_second_and_eta(monkeypatch):
    # Resumed at step 250 with 16,000 images already seen (batch 64): the first window is 25 steps,
    # 1,600 images in 50 s, so 32 img/s, not the 17,600 images since step 0 over 50 s.
    _clocked(monkeypatch, [0.0, 50.0])
    out = io.StringIO()
    p = progress_lib.Progress(1600, start_step=250, stream=out, start_images=16000)
    assert p.log(275, 17600, {"d_loss": 0.5})["images_per_s"] == 32.0
    line = out.getvalue()
    assert "step 275/1600" in line and "32.0 img/s" in line
    assert "ETA 44:10" in line  # 1,325 steps left at 2 s per step since the resume
