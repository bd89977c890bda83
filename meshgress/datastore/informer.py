"""List+watch into an in-memory cache, the way Kubernetes informers do, for any Datastore.

Agents and gateways never act on a watch event directly: events only update caches, and a
level-triggered loop reads the caches when it is poked. This module is that first half.
It lists, then watches from the list's resource version; on `Expired` (410 Gone) or any
datastore error it lists again after a capped exponential backoff, replacing the cache
wholesale so deletes missed during the gap cannot linger. `synced` is set once the first
list has landed, so callers can hold back apply until the cache is complete (as Felix does).

An object the store could not decode (`ListResult.rejected`) is skipped, logged, and kept
in `rejected()` until a later list no longer has it or a watch event brings that object in
a readable state (or its deletion), so the process syncs and reports it instead of failing.

The callback runs on the informer's thread and must stay cheap: record, poke, return.
A `matters` filter can hold it back for a modification the caller computes nothing new
from (a lease renewal, say): the cache takes every change either way, so the next pass
sees it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from meshgress.datastore import (
    Datastore,
    DatastoreError,
    Kind,
    Object,
    RejectedObject,
    WatchStop,
    object_key,
)

log = logging.getLogger(__name__)

CacheKey = tuple[str, str]

ChangeFilter = Callable[[Object, Object], bool]
"""(the cached object, its modified state) → whether the change is worth calling
`on_change` for."""


class Informer:
    """A cache of one kind (optionally only pods on one node), kept fresh by a thread."""

    def __init__(self, store: Datastore, kind: Kind, *, on_change: Callable[[], None],
                 field_node_name: str | None = None, max_backoff: float = 5.0,
                 bookmark_interval: float = 10.0, matters: ChangeFilter | None = None) -> None:
        self._store = store
        self.kind = kind
        self._on_change = on_change
        self._node = field_node_name
        self._max_backoff = max_backoff
        self._bookmark_interval = bookmark_interval
        self._matters = matters
        self._lock = threading.Lock()
        self._items: dict[CacheKey, Object] = {}
        self._rejected: dict[CacheKey, RejectedObject] = {}
        self.synced = threading.Event()
        self.relists = 0
        self.errors = 0
        self._stop = WatchStop()
        self._thread = threading.Thread(target=self._run, name=f"informer-{kind}", daemon=True)

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def snapshot(self) -> dict[CacheKey, Object]:
        """A shallow copy of the cache; objects must be treated as read-only."""
        with self._lock:
            return dict(self._items)

    def rejected(self) -> tuple[RejectedObject, ...]:
        """The objects of this kind the store could not decode, skipped by the cache."""
        with self._lock:
            return tuple(self._rejected[key] for key in sorted(self._rejected))

    def _note_rejected(self, rejected: tuple[RejectedObject, ...]) -> None:
        now = {(r.namespace, r.name): r for r in rejected}
        with self._lock:
            before, self._rejected = self._rejected, now
        for key, item in sorted(now.items()):
            if before.get(key) != item:
                log.warning("informer %s: skipping an object the datastore cannot read: %s",
                            self.kind, item.describe())
        for key in sorted(before.keys() - now.keys()):
            log.info("informer %s: %s is no longer rejected", self.kind,
                     "/".join(part for part in key if part))

    def _keep(self, obj: Object) -> bool:
        if self._node is None:
            return True
        return bool((obj.get("spec") or {}).get("nodeName") == self._node)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                listed = self._store.list(self.kind, field_node_name=self._node)
                with self._lock:
                    self._items = {object_key(o): o for o in listed.items}
                self._note_rejected(listed.rejected)
                self.relists += 1
                self.synced.set()
                self._on_change()
                backoff = 0.05
                for event in self._store.watch(frozenset({self.kind}), listed.resource_version,
                                               stop=self._stop,
                                               bookmark_interval=self._bookmark_interval,
                                               field_node_name=self._node):
                    if event.type == "BOOKMARK":
                        continue
                    key = object_key(event.object)
                    with self._lock:
                        # A write through the store replaced or removed a rejected object.
                        if self._rejected.pop(key, None) is not None:
                            log.info("informer %s: %s is no longer rejected", self.kind,
                                     "/".join(part for part in key if part))
                        if event.type == "DELETED" or not self._keep(event.object):
                            changed = self._items.pop(key, None) is not None
                        else:
                            before = self._items.get(key)
                            self._items[key] = event.object
                            changed = before is None or self._matters is None \
                                or self._matters(before, event.object)
                    if changed:
                        self._on_change()
            except Exception as exc:
                self.errors += 1
                if isinstance(exc, DatastoreError):
                    log.warning("informer %s: %s; listing again in %.2fs", self.kind, exc,
                                backoff)
                else:
                    # A fault the store did not foresee must not freeze this cache for good
                    # while the process looks alive: report it whole and list again.
                    log.exception("informer %s: unexpected failure; listing again in %.2fs",
                                  self.kind, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
