"""`kvpager.cuda_release`: a finalizer's release made at once, or kept while a
CUDA graph capture is under way in this thread and made once it is over. The
capture itself, on a GPU: tests/test_gpu_release.py."""

from __future__ import annotations

import pytest

from kvpager import cuda_release


@pytest.fixture
def capture(monkeypatch):
    """A switch for whether this thread is capturing."""
    state = {"on": False}
    monkeypatch.setattr(cuda_release, "capturing", lambda: state["on"])
    yield state
    state["on"] = False
    cuda_release.flush()


def test_releases_wait_for_the_capture_then_run_in_order(capture):
    done = []
    cuda_release.release(done.append, "a")
    assert done == ["a"]
    capture["on"] = True
    cuda_release.release(done.append, "b")
    cuda_release.release(done.append, "c")
    cuda_release.flush()  # still capturing: nothing runs
    assert done == ["a"] and cuda_release.pending() == 2
    capture["on"] = False
    cuda_release.release(done.append, "d")  # the kept ones first
    assert done == ["a", "b", "c", "d"] and cuda_release.pending() == 0


def test_flush_after_the_capture(capture):
    done = []
    capture["on"] = True
    cuda_release.release(done.append, 1)
    capture["on"] = False
    cuda_release.flush()
    assert done == [1] and cuda_release.pending() == 0


def test_nothing_is_capturing_without_cuda():
    assert cuda_release.capturing() is False
