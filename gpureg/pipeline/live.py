"""Following a Bluesky run in Tiled as it is written (``gpureg watch URI``), and publishing the result back.

The run (as Bluesky's ``TiledWriter`` writes it; :mod:`gpureg.io.tiled_run`) is
re-read every ``poll`` seconds while frames are coming in (a new frame in the
last ``ACTIVE_S`` seconds), backing off to ``max_poll`` while the run is idle.
Where the server streams (Tiled's websocket subscription; a server with a
streaming cache), every appended event row and detector frame wakes the watcher
at once (:class:`gpureg.io.tiled_stream.Wakeup`), and the polling slows to one
read per ``STREAMING_POLL`` seconds, a safety net; a server that refuses the
subscription is polled as above. Each energy is reconstructed and registered (as by folder watch:
:func:`gpureg.pipeline.watch.register_arrival`) as soon as it is complete: its
planned number of projections is in (``angles``, or the run's start document:
:func:`gpureg.io.tiled_run.planned_counts`), else a later energy has started,
or the run's stop document is in. The watch ends on
the stop document, ``expect`` energies, ``idle_timeout`` seconds without a new
frame, or Ctrl-C; what was done is kept in ``OUTPUT.watch/`` and the same
command resumes it. A server that goes away is retried with backoff (one line
when it goes, one when it is back) for up to ``outage_timeout`` seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from ..io.files import BadEnergyError, InputError, atomic_path
from ..io.lock import OutputLock
from ..io.results import lock_path, watch_dir
from ..io.tiled import connect, describe_node, is_bluesky_run, normalize_uri, retrying, set_outage_limit
from ..io.tiled_run import BlueskyRun
from ..io.tiled_stream import Wakeup
from .options import RunOptions, resolve_devices
from .steps import Loader, check_output
from .watch import WatchState, finish_watch, provisional_reference, register_arrival, watch_options

__all__ = ["follow_run"]

_log = logging.getLogger("gpureg")
ACTIVE_S = 10.0  # a run with a new frame in the last ACTIVE_S seconds is polled every `poll` seconds
STREAMING_POLL = 1.0  # while the server streams updates, a read at least this often anyway


def follow_run(uri, output, options: RunOptions | None = None, *, expect: int | None = None,
               idle_timeout: float | None = None, poll: float = 0.25, max_poll: float = 2.0,
               outage_timeout: float = 600.0, overwrite: bool = False, publish: str | None = None, on_energy=None,
               angles: int | None = None, **settings):
    """Process the energies of a Bluesky run in Tiled as they are acquired; finish with a full result.

    Parameters
    ----------
    uri : str
        The run's Tiled URI (``http(s)://HOST:PORT/api/v1/metadata/UID``).
    output : str or Path
        Result HDF5 written at the end (as by ``gpureg run``).
    options : RunOptions, optional
        As for :func:`gpureg.pipeline.watch.watch`.
    expect : int, optional
        Finish after this many energies.
    idle_timeout : float, optional
        Finish after this many seconds without a new frame.
    poll, max_poll : float
        Seconds between reads of the run: ``poll`` while frames come in (one in the last ``ACTIVE_S`` = 10 s),
        then doubling to ``max_poll`` while the run is idle. While the server streams updates (each wakes the
        watcher), at least ``STREAMING_POLL`` = 1 s.
    outage_timeout : float
        Seconds an unreachable server is retried before the watch stops (resumable).
    overwrite : bool
        Replace a finished ``output`` and forget an earlier watch's state.
    publish : str, optional
        Tiled container URI to publish the result into (:func:`gpureg.io.tiled_publish.publish_result`).
    angles : int, optional
        Projections per energy: an energy is processed as soon as this many are in (with its open-beam frames).
        Default: from the run's start document (``angles_per_energy``, ``num_angles``, ``n_angles``); when
        neither gives it, an energy is processed once the next one starts or the run stops.
    on_energy : callable, optional
        Called as ``on_energy(event)`` after each energy: folder watch's event plus
        ``after_last_frame_s`` (the energy's last frame -> registered, by the run's time stamps),
        ``found_after_s`` (its last frame -> found complete) and ``processing_s`` (read + reconstruct + register).
    **settings
        Shorthand for ``RunOptions(...)`` fields when ``options`` is not given.

    Returns
    -------
    gpureg.pipeline.PipelineResult
    """
    options = watch_options(options, settings, "follow_run")
    uri = normalize_uri(str(uri)).rstrip("/")
    check_output(output, overwrite)
    set_outage_limit(outage_timeout)
    with OutputLock(output, lock_path(output)):
        if overwrite and watch_dir(output).exists():
            shutil.rmtree(watch_dir(output))
        reader = _open_run(uri, outage_timeout, angles)
        state = WatchState(watch_dir(output))
        _claim(state, reader)
        devices = resolve_devices(options.device)
        wake = Wakeup()
        try:
            _follow(reader, state, options, devices, expect, idle_timeout, (poll, max_poll, wake), outage_timeout,
                    on_energy)
        except KeyboardInterrupt:
            _log.warning("gpureg: watch interrupted with %d energies done (kept in %s); run the same command again "
                         "to resume", len(state.entries), state.folder)
            raise
        finally:
            wake.close()
        result = finish_watch(uri, output, state, options, devices, overwrite)
    if publish:
        from ..io.tiled_publish import publish_result

        where = publish_result(result.output, publish, run_uid=reader.uid, source=uri)
        _log.warning("gpureg: published to %s", where)
    return result


def _open_run(uri, outage_timeout, angles=None):
    node = connect(uri, retry_for=outage_timeout)
    if not is_bluesky_run(node):
        raise InputError(f"{uri}: holds {describe_node(node, uri)}, not a Bluesky run; watch follows a run written "
                         "by TiledWriter (use gpureg run for a finished scan in another layout)")
    reader = retrying(lambda: BlueskyRun(node, uri, angles=angles), uri, outage_timeout)
    if reader.stopped:  # a finished run: every energy is complete anyway
        return reader
    if reader.planned_angles is None:
        _log.warning("gpureg: watch: projections per energy not in the run's start document (angles_per_energy, "
                     "num_angles, n_angles): an energy is processed once the next one starts; --angles N processes "
                     "it as soon as its N projections are in")
    else:
        _log.warning("gpureg: watch: %d projections per energy (%s): an energy is processed as soon as they are in",
                     reader.planned_angles, reader.plan_source)
    return reader


def _claim(state, reader):
    """Refuse a watch state left by another run (resuming must continue the same run)."""
    marker = state.folder / "run.json"
    if marker.exists():
        uid = json.loads(marker.read_text()).get("run_uid")
        if uid != reader.uid:
            raise InputError(f"{state.folder}: holds the watch state of run {uid}, not of {reader.uid}; pass "
                             "overwrite=True to start over")
    else:
        with atomic_path(marker) as tmp:
            Path(tmp).write_text(json.dumps({"run_uid": reader.uid, "source": str(reader.path)}))


def _follow(reader, state, options, devices, expect, idle_timeout, polling, outage_timeout, on_energy):
    poll, max_poll, wake = polling
    dev = devices.registration
    reference = provisional_reference(state, options, dev)
    loader = Loader.for_run(reader, options, devices)
    done = {round(v["energy"], 3) for v in state.entries.values()}
    told_bad, told_live, frames, last_new, wait = set(), False, -1, time.monotonic(), poll
    while True:
        tick = time.monotonic()
        retrying(reader.refresh, str(reader.path), outage_timeout)
        for key, node in reader.nodes.items():
            wake.follow(key, node)
        if reader.n_frames != frames:
            frames, last_new = reader.n_frames, time.monotonic()
        for energy, reason in reader.bad.items():
            if energy not in told_bad:
                _log.warning("gpureg: watch: %.2f eV left out: %s", energy, reason)
                told_bad.add(energy)
        for energy in reader.acquired:
            if round(energy, 3) in done:
                continue
            seen = time.monotonic()
            i = reader.index_of(energy)
            found = time.time() - reader.last_frame_time(i)
            try:
                vol, _ = loader(i)
            except BadEnergyError as exc:
                _log.warning("gpureg: watch: %.2f eV left out: %s", energy, str(exc).splitlines()[0])
                done.add(round(energy, 3))
                continue
            aligned = loader.alignments.pop(i, None)  # per-projection shifts, with --align-projections
            reference, event = register_arrival(state, f"{energy:.2f} eV", energy, vol, reference, options, dev,
                                                seen, alignment=None if aligned is None else (aligned, reader.theta))
            done.add(round(energy, 3))
            event["processing_s"] = time.monotonic() - seen
            event["after_last_frame_s"] = time.time() - reader.last_frame_time(i)
            event["found_after_s"] = found
            if on_energy is not None:
                on_energy(event)
            if expect is not None and len(state.entries) >= expect:
                break
        if expect is not None and len(state.entries) >= expect:
            _log.warning("gpureg: watch: %d energies, as expected; finishing", len(state.entries))
            return
        if reader.stopped and all(round(e, 3) in done for e in reader.acquired):
            _log.warning("gpureg: watch: run %s stopped; finishing with %d energies", reader.uid[:8],
                         len(state.entries))
            return
        if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
            _log.warning("gpureg: watch: no new frame for %g s; finishing with %d energies", idle_timeout,
                         len(state.entries))
            return
        wait = poll if time.monotonic() - last_new < ACTIVE_S else min(2 * wait, max_poll)  # back off when idle
        if wake.live and not told_live:
            _log.warning("gpureg: watch: the server streams the run's updates; each new frame wakes the watcher")
            told_live = True
        wake.wait(tick + (max(wait, STREAMING_POLL) if wake.live else wait) - time.monotonic())
