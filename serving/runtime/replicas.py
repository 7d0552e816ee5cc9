"""Shard replicas: node-local verified copies of index shards, exact search over them, and their health.

A ``ShardServer`` replica serves a group of shards of one index version. It fetches each shard's files
from the artifact root into a node-local cache (``<cache_dir>/<node id>/...``) and checks them against
the source's manifest there. Three outcomes, each reported to ``ShardReports`` with the reason:

* every copy verifies: the replica is ready and healthy;
* a copy that was already in the cache fails its check (the node's disk copy went bad): the copy is
  dropped and the replica fails its health check, so Serve replaces it with one that fetches afresh;
  meanwhile the router retries its calls (``ShardNotReady``) on the group's other replicas;
* a file read from the source fails its check (checked in memory, before it enters the cache), or is
  missing there: the source itself is bad, a restart would fail the same way, so the replica stays up,
  healthy and unready, and says why.

``ShardReports`` (one small replica) keeps each shard replica's latest report and the reasons of recent
replacements; the router's ``/v1/readyz`` reads it, so readiness covers every replica, not one at random.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
from ray import serve

from serving.index.items import describe, extent
from serving.index.files import ShardIntegrityError
from serving.index.topk import merge_topk
from serving.index.versions import load_shard, read_manifest
from serving.runtime.calls import awaited
from serving.storage import LocalRoot, sha256_file

log = logging.getLogger("ray.serve")  # Serve writes this logger to each replica's log file

REPORT_TTL_PERIODS = 3  # a replica silent for this many health periods is gone from readiness
HISTORY_S = 600.0  # how long readiness remembers why a replica was replaced
REPORT_TIMEOUT_S = 5.0
# A group searches its shards side by side only from this many rows in all: below, waking threads costs
# more than the searches (a flat search scans about a million 64-bit codes a millisecond).
PARALLEL_ROWS = 400_000


class ShardNotReady(RuntimeError):
    """A shard replica that holds no verified copy of its shards: it answers no searches."""


class LocalCopyBad(ShardIntegrityError):
    """A node-local copy that no longer matches the source's manifest (the source itself may be fine)."""


def sync_to_cache(source, cache: Path, collection: str, version: str, name: str) -> None:
    """Make ``cache`` hold verified copies of one shard's files and the source's manifest, under a per-node
    lock (replicas on one node share the cache).

    A file already cached is checked against the manifest's sha256: when it no longer matches it is
    deleted and LocalCopyBad raised (a fresh replica fetches it again). A file not cached is read from
    the source and checked in memory before it is written: missing or wrong there is a
    ShardIntegrityError about the source, and nothing bad enters the cache.
    """
    import fcntl

    manifest = read_manifest(source, version, collection)
    entry = next((e for e in manifest["shards"] if e["name"] == name), None)
    if entry is None:
        raise ShardIntegrityError(name, f"not in the manifest of {collection}/{version}")
    local, prefix = LocalRoot(cache), f"index/{collection}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        local.write_bytes(f"{prefix}/{version}/manifest.json", source.read_bytes(f"{prefix}/{version}/manifest.json"))
        stale = []
        for info in entry["files"].values():
            key, path = f"{prefix}/{info['path']}", cache / prefix / info["path"]
            if path.exists():
                actual = sha256_file(path)
                if actual != info["sha256"]:
                    path.unlink()
                    stale.append(LocalCopyBad(name, "checksum mismatch", str(path), info["sha256"], actual))
                continue
            try:
                blob = source.read_bytes(key)
            except FileNotFoundError as err:
                raise ShardIntegrityError(name, f"missing at the source ({err})", info["path"]) from None
            actual = hashlib.sha256(blob).hexdigest()
            if actual != info["sha256"]:
                raise ShardIntegrityError(name, "checksum mismatch at the source", info["path"], info["sha256"], actual)
            local.write_bytes(key, blob)  # verified bytes only; written to a temporary name, then renamed
    if stale:
        raise LocalCopyBad(name, f"node-local copy at {cache} failed its check ({stale[0]}); dropped it, "
                                 "this replica will be replaced by one that fetches it again")


def cache_folder(cache_dir: str | os.PathLike, node: str, source_uri: str) -> Path:
    """Where a node keeps its copies of one artifact root's shards: ``<cache_dir>/<node>/<source hash>``."""
    return Path(cache_dir) / node / hashlib.sha256(source_uri.encode()).hexdigest()[:16]


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class ShardReports:
    """Latest report of every shard replica, and why recent ones were replaced (for ``/v1/readyz``)."""

    def __init__(self):
        self.reports: dict[str, dict] = {}
        self.replaced: list[dict] = []

    async def report(self, report: dict) -> None:
        self.reports[report["replica"]] = {**report, "updated": time.time()}

    async def snapshot(self) -> dict:
        """{"replicas": [current reports], "replaced": [recent replacements]}, each sorted."""
        now = time.time()
        for replica, report in list(self.reports.items()):
            if now - report["updated"] > REPORT_TTL_PERIODS * report["period_s"] + 5:
                self.reports.pop(replica, None)
                if not report["healthy"]:
                    self.replaced.append({**report, "replaced": now})
        self.replaced = [r for r in self.replaced if now - r["replaced"] < HISTORY_S]
        return {"replicas": sorted(self.reports.values(), key=lambda r: (r["deployment"], r["replica"])),
                "replaced": sorted(self.replaced, key=lambda r: r["replaced"])}


@serve.deployment(max_ongoing_requests=32, health_check_timeout_s=10)
class ShardServer:
    """A group of shards of one index version (one shard by default), searched exactly (ties by row).

    Each shard is a serving.index.shards.Shard; a group searches its shards side by side in threads (faiss
    releases the GIL) and answers its own top-k, merged as the router merges groups, so one call
    serves several shards. Grouping trades spreading for fewer calls per query: on one node, one
    group of every shard saves a Serve round trip per extra shard.
    """

    async def __init__(self, root: str, collection: str, version: str, shard_names: list[str], reports=None,
                       threads: int = 1, cache_dir: str | None = None, period_s: float = 2.0,
                       key_file: str | None = None):
        from serving.index.shards import set_search_threads
        from serving.storage import open_root

        set_search_threads(threads)
        self.reports, self.period_s, self.key_file = reports, period_s, key_file
        self.replica, self.deployment, self.node = _whereabouts()
        self.labels = [f"{collection}/{version}/{name}" for name in shard_names]
        self.shards, self.problems, self.healthy = [], {}, True
        source = open_root(root)
        cache = cache_folder(cache_dir, self.node, source.uri) if cache_dir else None
        for name, label in zip(shard_names, self.labels):
            try:
                self.shards.append(self._load(source, cache, collection, version, name))
            except ShardIntegrityError as err:
                self.problems[label] = str(err)
                log.error("refusing shard %s: %s", label, err)
        self.rows = sum(len(shard) for shard in self.shards)
        if not self.problems:
            self.id_position = {name: (s, i) for s, shard in enumerate(self.shards)
                                for i, name in enumerate(shard.ids.tolist())}
            log.info("shards %s loaded: %s rows", "+".join(self.labels), [len(shard) for shard in self.shards])
        self.pool = None
        if len(shard_names) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=len(shard_names) - 1, thread_name_prefix="shard")
        await self._report()

    def _load(self, source, cache: Path | None, collection: str, version: str, name: str):
        """The verified shard: read from the source, or through the node-local ``cache``."""
        if cache is None:
            return load_shard(source, version, name, collection, key_file=self.key_file)
        try:
            sync_to_cache(source, cache, collection, version, name)
        except LocalCopyBad:
            self.healthy = False  # the health check fails: Serve replaces this replica
            raise
        # row counts, widths, order; an encrypted index is decrypted in memory only (the cache holds ciphertext)
        return load_shard(LocalRoot(cache), version, name, collection, key_file=self.key_file)

    async def check_health(self) -> None:
        """Serve's health check: reports to ShardReports, and fails while the node-local copy is bad."""
        await self._report()
        if not self.healthy:
            raise RuntimeError("; ".join(self.problems.values()))

    async def _report(self) -> None:
        if self.reports is None:
            return
        report = {"replica": self.replica, "deployment": self.deployment, "node": self.node,
                  "healthy": self.healthy, "period_s": self.period_s, "shards": self.ready()}
        try:
            await asyncio.wait_for(awaited(self.reports.report.remote(report)), REPORT_TIMEOUT_S)
        except Exception as err:  # readiness reporting must never fail the replica itself
            log.warning("could not report readiness: %s", err)

    def ready(self) -> list[dict]:
        """One {"shard", "ready", "rows", "problem"} per shard of the group. A group serves all its shards or
        none: one bad shard holds the others back (rows 0 while not serving)."""
        if not self.problems:
            return [{"shard": label, "ready": True, "rows": len(shard), "problem": None}
                    for label, shard in zip(self.labels, self.shards)]
        held = f"held back: {', '.join(sorted(self.problems))} of this replica's group is not serving"
        return [{"shard": label, "ready": False, "rows": 0, "problem": self.problems.get(label, held)}
                for label in self.labels]

    def search(self, queries: np.ndarray, k: int, with_codes: bool = False, where=None) -> dict:
        """Top-k of packed ``queries`` (Q, bytes) over the group: distances, rows, ids, image ids (and
        codes, and each hit's metadata when the index has it: serving.index.items.describe), each (Q, k),
        ordered by (distance, row). ``where``: a serving.index.items.ItemFilter the hits must pass."""
        shards = self._loaded()
        if self.pool is None or self.rows < PARALLEL_ROWS:  # (distances, rows) (Q, k) each
            per_shard = [shard.search(queries, k, where) for shard in shards]
        else:  # the other shards in the pool, the first in this thread meanwhile
            others = [self.pool.submit(shard.search, queries, k, where) for shard in shards[1:]]
            per_shard = [shards[0].search(queries, k, where)] + [f.result() for f in others]
        distances, rows = per_shard[0] if len(per_shard) == 1 else merge_topk(per_shard, k)
        ids = np.full(rows.shape, "", dtype=object)
        image_ids = np.full(rows.shape, "", dtype=object)
        texts = np.full(rows.shape, "", dtype=object) if shards[0].texts is not None else None
        codes = np.zeros(rows.shape + (shards[0].codes.shape[1],), np.uint8) if with_codes else None
        meta = np.full(rows.shape, None, dtype=object) if any(shard.meta is not None for shard in shards) else None
        for shard in shards:
            positions = shard.positions(rows)  # -1 where the row is another shard's, or padding
            found = positions >= 0
            take = positions[found]
            ids[found], image_ids[found] = shard.ids[take], shard.image_ids[take]
            if texts is not None:
                texts[found] = shard.texts[take]
            if with_codes:
                codes[found] = shard.codes[take]  # padded places hold a zero code
            if meta is not None and shard.meta is not None:
                for q, j in zip(*np.nonzero(found)):
                    meta[q, j] = describe(shard.meta, positions[q, j])
        out = {"distances": distances, "rows": rows, "ids": ids, "image_ids": image_ids}
        if texts is not None:
            out["texts"] = texts
        if meta is not None:
            out["meta"] = meta
        if with_codes:
            out["codes"] = codes
        return out

    def list_items(self, where, after: str | None, limit: int) -> dict:
        """The group's items that pass ``where`` (an ItemFilter, or None for all), ordered by id: the first
        ``limit`` with an id after ``after``, and how many pass in all. Each: row, id, image_id and
        serving.index.items.describe's fields."""
        shards = self._loaded()
        found, matched = [], 0
        for s, shard in enumerate(shards):
            by_id = shard.id_order
            if where is not None:
                by_id = by_id[where.mask(shard.meta, len(shard))[by_id]]
            matched += len(by_id)
            start = 0 if after is None else int(np.searchsorted(shard.ids[by_id], after, side="right"))
            found += [(shard.ids[p], s, p) for p in by_id[start:start + limit].tolist()]
        found.sort()
        return {"matched": matched, "items": [self._item(shards[s], p) for _, s, p in found[:limit]]}

    def extent(self) -> list[dict]:
        """Each shard's serving.index.items.extent (footprints' box, times' interval)."""
        return [extent(shard.meta) for shard in self._loaded()]

    def item(self, item_id: str) -> dict | None:
        """An indexed item's row, id, image_id and metadata, or None if this group does not hold it."""
        shards = self._loaded()
        where = self.id_position.get(item_id)
        return None if where is None else self._item(shards[where[0]], where[1])

    @staticmethod
    def _item(shard, position: int) -> dict:
        item = {"row": int(shard.rows[position]), "id": str(shard.ids[position]),
                "image_id": str(shard.image_ids[position])}
        return {**item, **(describe(shard.meta, position) if shard.meta is not None else {})}

    def code_of(self, item_id: str):
        """The packed code (bytes,) of an indexed id, or None if this group does not hold it."""
        shards = self._loaded()
        where = self.id_position.get(item_id)
        return None if where is None else shards[where[0]].codes[where[1]]

    def _loaded(self) -> list:
        if self.problems:
            raise ShardNotReady(f"replica {self.replica} on node {self.node[:12]}: " +
                                "; ".join(f"shard {label} is not serving: {problem}"
                                          for label, problem in self.problems.items()))
        return self.shards


def _whereabouts() -> tuple[str, str, str]:
    """(replica id, deployment, node id); placeholders in Serve's local testing mode (no replicas, no Ray)."""
    import ray
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
        replica, deployment = context.replica_id.unique_id, context.deployment
    except RayServeException:
        replica, deployment = "local", "local"
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    return replica, deployment, node

