"""The background writer: bounded queue, write errors raised in the processing thread, nothing after them."""

import threading

import numpy as np
import pytest

from gpureg.pipeline.writer import BackgroundWriter


class _Store:
    """Records writes; fails on energy ``fail``; each write waits for ``gate`` when given."""

    def __init__(self, fail=None, gate=None):
        self.written, self.fail, self.gate = [], fail, gate
        self.entered = threading.Event()
        self.recorded = None

    def record_writer(self, **totals):
        self.recorded = totals

    def write_energy(self, i, *args):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5)
        if i == self.fail:
            raise OSError(28, "No space left on device")
        self.written.append(i)


def _args(k):
    return (None, None, np.eye(4) * k, 1.0, 0.5, {})


def test_writes_in_order_and_reports_each_after_it_is_written():
    store, seen = _Store(), []
    with BackgroundWriter(store, after=lambda i, s: seen.append((i, store.written[-1]))) as w:
        for i in range(5):
            w.submit(i, *_args(i))
    assert store.written == [0, 1, 2, 3, 4] and seen == [(i, i) for i in range(5)]
    assert w.pending == {}
    assert store.recorded["busy"] >= 0 and store.recorded["waited"] >= 0


def test_queue_is_bounded_and_pending_matrices_are_visible():
    gate = threading.Event()
    store = _Store(gate=gate)
    w = BackgroundWriter(store, depth=2)
    for i in range(3):  # one in the writer's hands, two queued
        w.submit(i, *_args(i))
        if i == 0:
            assert store.entered.wait(5)
    blocked = threading.Thread(target=w.submit, args=(3, *_args(3)))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # the fourth waits: at most depth energies queued
    assert sorted(w.pending) == [0, 1, 2, 3] and np.array_equal(w.pending[2], np.eye(4) * 2)
    gate.set()
    blocked.join(5)
    w.close()
    assert store.written == [0, 1, 2, 3] and w.pending == {}


def test_a_write_error_reaches_the_processing_thread_and_stops_writing():
    store = _Store(fail=1)
    w = BackgroundWriter(store)
    with pytest.raises(OSError, match="No space left"):
        for i in range(50):
            w.submit(i, *_args(i))
        w.close()
    assert store.written == [0]  # nothing after the failed energy is written (so none is flagged done)
    assert 1 in w.pending


def test_abandon_drops_queued_energies_without_writing_them():
    gate = threading.Event()
    store = _Store(gate=gate)
    w = BackgroundWriter(store, depth=3)
    for i in range(3):
        w.submit(i, *_args(i))
    assert store.entered.wait(5)  # the writer holds energy 0; 1 and 2 are queued
    threading.Timer(0.2, gate.set).start()
    w.abandon()  # e.g. Ctrl-C in the processing thread: the write in progress ends, the rest is not written
    assert store.written == [0]
