"""Wake-ups from Tiled's streaming subscription (websocket), where the server offers it.

A Tiled server with a streaming cache (``streaming_cache: {uri: memory}`` or a
Redis ``uri`` in its configuration file; ``tiled serve catalog --temp`` sets up the
memory one) pushes every row appended to an event table and every detector frame
registered in an array to the subscribers of that node. :class:`Wakeup` subscribes
to the nodes it is given, each in a background thread, and sets an event on any
update; ``gpureg watch`` waits on it instead of sleeping between reads of the run.
The run is still read over HTTP: an update only says *when* to read, so a missed
or reordered message costs at most one polling interval.

A server without a streaming cache refuses the websocket (Tiled 0.2.20: HTTP 500 at
the handshake); the first refusal turns the wake-ups off and the watcher polls as
before. (``tiled serve catalog --cache memory`` itself fails in Tiled 0.2.20 with an
``UnboundLocalError``; the configuration file works.)
"""

from __future__ import annotations

import logging
import threading

__all__ = ["Wakeup"]

_log = logging.getLogger("gpureg")


class Wakeup:
    """Set an event whenever a subscribed Tiled node reports an update.

    Attributes
    ----------
    heard : bool
        An update has come: the server streams (until ``refused``).
    refused : bool
        A subscription failed (no streaming on this server, or it went away for good): rely on polling.
    """

    def __init__(self):
        self._event = threading.Event()
        self._subs = {}
        self._lock = threading.Lock()
        self.heard = self.refused = False

    @property
    def live(self) -> bool:
        """Updates are coming and no subscription has failed."""
        return self.heard and not self.refused

    def _on_update(self, update):  # a bound method: Tiled holds callbacks by weak reference
        self.heard = True
        self._event.set()

    def follow(self, key, node) -> None:
        """Subscribe to ``node`` (a Tiled client node: container, table or array), once per ``key``."""
        with self._lock:
            if self.refused or key in self._subs or not hasattr(node, "subscribe"):
                return
            try:
                sub = node.subscribe()
            except Exception as exc:  # noqa: BLE001 - any client failure only means: poll
                self._refuse(key, exc)
                return
            for name in ("new_data", "child_created", "child_metadata_updated"):
                registry = getattr(sub, name, None)
                if registry is not None:
                    registry.add_callback(self._on_update)
            self._subs[key] = sub
        threading.Thread(target=self._run, args=(key, sub), daemon=True, name=f"gpureg-wakeup-{key}").start()

    def _run(self, key, sub):
        try:
            sub.start()  # blocks; the client reconnects by itself after a dropped connection
        except Exception as exc:  # noqa: BLE001 - refused (HTTP 500 without a streaming cache) or gone for good
            with self._lock:
                self._refuse(key, exc)

    def _refuse(self, key, exc):
        if not self.refused:
            _log.info("gpureg: Tiled streaming subscription of %s not available (%s: %s); polling", key,
                      type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        self.refused = True
        self._event.set()  # wake the waiter: it goes back to polling

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an update; True if one came (the event is then cleared)."""
        fired = self._event.wait(max(0.0, timeout))
        self._event.clear()
        return fired

    def close(self) -> None:
        """End every subscription (without waiting for their threads)."""
        with self._lock:
            subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            try:
                sub.disconnect(wait=False)
            except Exception:  # noqa: BLE001, S110 - closing a dead websocket may raise; nothing to do
                pass
