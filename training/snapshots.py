"""What the image job publishes for the text job in the split schedules: its codes and proxies.

The image job (the heavy teacher) defines the code space; the text job learns to map captions into
it. In the "async" schedule the two run at once: every few steps the image job publishes a
``Snapshot`` (the continuous codes of the train and val images, and the class proxies), and the
text job picks up the newest one at the start of each epoch, without waiting for a fresh one. The
image job ends by publishing its selected checkpoint's snapshot, marked ``final``; the text job's
last epochs train against it, so the text head matches the image codes it ships with.

``SnapshotStore`` is plain Python: one process uses it directly ("sync" without Ray), and
``RemoteSnapshots`` reaches one held by a Ray actor, so that the two Ray Train runs share it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    version: int  # 1, 2, ... in publishing order
    image_step: int  # optimizer steps the image job had taken
    image_epoch: int  # epochs it had completed
    final: bool  # the image job's selected checkpoint: nothing newer will come
    codes: np.ndarray  # (N, nbits) float32 continuous code of every dataset image; NaN for rows not shared (test)
    proxies: np.ndarray  # (C, nbits) class proxies


class SnapshotError(RuntimeError):
    """The image job failed, or published nothing in time: the text job cannot go on."""


class SnapshotStore:
    """Holds the newest snapshot; publishing an older version than the held one is ignored."""

    def __init__(self):
        self._latest: Snapshot | None = None
        self._failure: str | None = None

    def publish(self, snapshot: Snapshot) -> None:
        if self._latest is None or snapshot.version > self._latest.version:
            self._latest = snapshot

    def fail(self, reason: str) -> None:
        """Tell waiting readers that no (further) snapshot will come."""
        self._failure = reason

    def latest(self) -> Snapshot | None:
        if self._failure is not None:
            raise SnapshotError(f"the image job stopped: {self._failure}")
        return self._latest


class RemoteSnapshots:
    """A SnapshotStore held by a named Ray actor; publishing does not wait for the actor."""

    def __init__(self, actor_name: str, namespace: str):
        import ray

        self.actor = ray.get_actor(actor_name, namespace=namespace)

    def publish(self, snapshot: Snapshot) -> None:
        self.actor.publish.remote(snapshot)

    def fail(self, reason: str) -> None:
        self.actor.fail.remote(reason)

    def latest(self) -> Snapshot | None:
        import ray

        return ray.get(self.actor.latest.remote())


def start_store_actor(name: str, namespace: str):
    """A SnapshotStore in a Ray actor named ``name`` (no CPU reserved: it only holds arrays)."""
    import ray

    return ray.remote(num_cpus=0)(SnapshotStore).options(name=name, namespace=namespace).remote()


def wait_for(store: SnapshotStore | RemoteSnapshots, final: bool = False, timeout: float = 24 * 3600,
             poll: float = 0.5) -> Snapshot:
    """The newest snapshot, waiting only when there is none yet (or, with ``final``, no final one)."""
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        snapshot = store.latest()
        if snapshot is not None and (snapshot.final or not final):
            if waited:
                log.info("text job: got image snapshot v%d (image epoch %d%s)", snapshot.version,
                         snapshot.image_epoch, ", final" if snapshot.final else "")
            return snapshot
        if time.monotonic() > deadline:
            raise SnapshotError(f"no {'final ' if final else ''}image snapshot after {timeout:.0f} s")
        if not waited:
            log.info("text job: waiting for the image job's %ssnapshot", "final " if final else "first ")
            waited = True
        time.sleep(poll)
