"""The audit trail of queries: one JSON line per request, hash-chained (serving.governance.chain, the same chain as the
alias log's), written by one ``AuditWriter`` replica off the request path and flushed every ``flush_s``.

An entry (the router fills every field but the chain's):

    {"time": "2026-01-01T12:00:00.123+00:00", "key": "ana", "role": "reader", "endpoint": "text",
     "query_sha256": "<hex of the query text, or of the image bytes>", "arm": "champion",
     "model_version": "...", "index_version": {"images": "v0002", ...}, "results": 10, "status": 200,
     "decision": "allowed", "request_id": "...", "replica": "...", "seq": 42, "prev_sha256": "<hex>",
     "sha256": "<hex>"}

``decision`` is ``allowed``, ``denied:<rule id>``, ``rate_limited``, ``unauthenticated`` (no or a wrong
key), ``forbidden`` (the role lacks the permission) or ``rejected`` (the request itself was bad).
Beside the log, ``LOG.head`` holds the last flushed entry's ``seq`` and ``sha256``: it catches entries
cut off the end, which a chain alone cannot.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ray import serve

from serving.governance.chain import ZERO_SHA256, chain_problems, seal

log = logging.getLogger("ray.serve")
TAIL_BYTES = 1 << 16  # the last entry is found in the file's last 64 KiB (an entry is well under 4 KiB)


def sha256_of(query: str | bytes) -> str:
    """The audit trail's record of a query: the sha256 of its text (UTF-8) or of the image bytes sent."""
    return hashlib.sha256(query.encode() if isinstance(query, str) else bytes(query)).hexdigest()


def audit_entry(who, endpoint: str, query_sha256: str | None, answered: dict, status: int, decision: str,
                request_id: str, replica: str) -> dict:
    """One request's entry, before the writer chains it (``who``: serving.governance.keys.Identity, None when the
    request was refused before anyone was identified)."""
    return {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "key": who.name if who is not None else None, "role": who.role if who is not None else None,
            "endpoint": endpoint, "query_sha256": query_sha256, "arm": answered.get("arm"),
            "model_version": answered.get("model_version"), "index_version": answered.get("index_version"),
            "results": answered.get("results"), "status": int(status), "decision": decision,
            "request_id": request_id, "replica": replica}


class AuditError(RuntimeError):
    """A query log that cannot be written or read as asked."""


class QueryLog:
    """The JSON-lines file at ``path`` and its head file ``path.head``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")

    def tail(self) -> tuple[int, str]:
        """(seq, sha256) of the last entry in the file, (0, zeros) for none; AuditError for a last line
        that does not parse (a torn write: `terrahash audit verify` shows where)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, ZERO_SHA256
        with open(self.path, "rb") as f:
            f.seek(max(0, self.path.stat().st_size - TAIL_BYTES))
            lines = [line for line in f.read().splitlines() if line.strip()]
        try:
            last = json.loads(lines[-1])
            return int(last["seq"]), str(last["sha256"])
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise AuditError(f"{self.path}: the last line is not an audit entry ({err}); nothing is appended to a "
                             f"log that may be broken (`terrahash audit verify {self.path}`)") from None

    def write(self, entries: list[dict]) -> None:
        """Append ``entries`` (sealed, in order), make them durable, then move the head to the last one."""
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
                       for e in entries).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)  # one write of the whole batch: O_APPEND keeps it whole at the end
            os.fsync(fd)
        finally:
            os.close(fd)
        head = self.head_path.with_name(self.head_path.name + ".tmp")
        head.write_text(json.dumps({"seq": entries[-1]["seq"], "sha256": entries[-1]["sha256"]}))
        os.replace(head, self.head_path)

    def read(self):
        """(line number, entry or the reason it does not parse) of every line."""
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    yield number, entry if isinstance(entry, dict) else "not a JSON object"
                except (ValueError, UnicodeDecodeError) as err:
                    yield number, str(err)

    def verify(self) -> tuple[list[str], int]:
        """(problems, entries): the chain checked line by line, and the head against the last entry."""
        if not self.path.exists():
            raise AuditError(f"{self.path}: no such audit log")
        read = [(f"{self.path}:{number}", entry) for number, entry in self.read()]
        problems, last_seq, last_sha = chain_problems(read)
        if self.head_path.exists():
            try:
                head = json.loads(self.head_path.read_text())
                if int(head["seq"]) > last_seq:
                    problems.append(f"{self.path}: entries {last_seq + 1}..{head['seq']} were cut off the end (the "
                                    f"head file records entry {head['seq']})")
                elif int(head["seq"]) == last_seq and head.get("sha256") != last_sha:
                    problems.append(f"{self.path}: the last entry is not the one the head file records")
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"{self.head_path}: unreadable head ({err})")
        return problems, len(read)

    def query(self, key: str | None = None, since: datetime | None = None, until: datetime | None = None,
              decision: str | None = None) -> list[dict]:
        """The entries of ``key`` (every key: None) from ``since`` to ``until``, with a decision starting
        with ``decision``, oldest first."""
        found = []
        for _, entry in self.read():
            if not isinstance(entry, dict):
                continue
            if key is not None and entry.get("key") != key:
                continue
            if decision is not None and not str(entry.get("decision", "")).startswith(decision):
                continue
            when = parse_time(entry.get("time", ""))
            if (since and when < since) or (until and when > until):
                continue
            found.append(entry)
        return found


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when it has no offset), or a span back from now: ``90s``, ``15m``, ``2h``, ``7d``."""
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return (now or datetime.now(timezone.utc)) - timedelta(**{unit: float(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: not a time (ISO 8601, e.g. 2026-01-01T12:00:00Z, or 90s, 15m, 2h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, health_check_period_s=1.0)
class AuditWriter:
    """The one writer of a query log: entries are chained as they arrive and flushed every ``flush_s``.

    A failed flush makes every later ``append`` and the health check fail, so Serve replaces the replica,
    which continues the chain from the file's last entry; the router fails closed or open meanwhile.
    """

    def __init__(self, path: str, flush_s: float = 1.0):
        self.log = QueryLog(path)
        self.seq, self.sha = self.log.tail()
        self.flush_s = float(flush_s)
        self.pending: list[dict] = []
        self.failed: str | None = None
        self._task: asyncio.Task | None = None

    async def append(self, body: dict) -> int:
        """Chain ``body`` as the next entry; its seq. Written within ``flush_s``."""
        if self.failed:
            raise AuditError(self.failed)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())
        entry = seal(body, self.seq + 1, self.sha)
        self.seq, self.sha = entry["seq"], entry["sha256"]
        self.pending.append(entry)
        return self.seq

    async def append_many(self, bodies: list[dict]) -> int:
        """Chain ``bodies`` in order (a router replica's buffer, serving.governance.query_log.AuditBuffer);
        the last seq."""
        for body in bodies:
            seq = await self.append(body)
        return seq if bodies else self.seq

    async def flush(self) -> int:
        """Write what is pending now; the last seq written."""
        batch, self.pending = self.pending, []
        if batch:
            try:
                await asyncio.to_thread(self.log.write, batch)
            except OSError as err:
                self.failed = f"{self.log.path}: cannot write the audit log: {err}"
                log.error("%s", self.failed)
                raise AuditError(self.failed) from None
        return self.seq - len(self.pending)

    async def _flush_loop(self) -> None:
        while not self.failed:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except AuditError:
                return

    def check_health(self) -> None:
        if self.failed:
            raise RuntimeError(self.failed)

    def __del__(self):
        if self.pending and not self.failed:  # a graceful shutdown: write what is left
            try:
                self.log.write(self.pending)
            except OSError:
                pass


AUDIT_BACKLOG = 1000  # entries a router replica holds for the writer before it refuses requests
HANDOFF_S = 0.05  # how often a router replica hands its entries to the writer
FRESH_S = 2 * HANDOFF_S  # a writer heard from this recently is trusted to take the next entry
HANDOFF_TIMEOUT_S = 2.0


class AuditBuffer:
    """A router replica's audit entries on their way to the ``AuditWriter`` (its handle ``writer``): handed
    over in batches every ``HANDOFF_S``, in order, off the request path.

    ``add`` says whether the trail took the entry. While the writer took the last batch less than
    ``FRESH_S`` ago (a replica under load), the entry joins the next batch and the request is answered
    at once; otherwise (a quiet replica, or a writer that failed) the entry is handed over before the
    answer, so a lost writer is noticed by the very next request. The trail does not take it while the
    writer fails or once ``bound`` entries wait: the router then refuses the request (``on_failure:
    closed``). Entries kept while the writer is away go to its successor, which continues the chain; past
    ``bound`` they are counted in ``dropped`` and logged, never silently lost.
    """

    def __init__(self, writer, bound: int = AUDIT_BACKLOG, period_s: float = HANDOFF_S, clock=time.monotonic):
        self.writer, self.bound, self.period_s, self.clock = writer, bound, period_s, clock
        self.pending: list[dict] = []
        self.failing: str | None = None
        self.dropped = 0
        self.heard = float("-inf")  # when the writer last took a batch
        self._task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None

    async def add(self, entry: dict) -> bool:
        if len(self.pending) >= self.bound:
            self.dropped += 1
            log.error("audit backlog full (%d entries): the entry of request %s is not recorded", self.bound,
                      entry.get("request_id"))
            return False
        self.pending.append(entry)
        if self.failing is None and self.clock() - self.heard < FRESH_S:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._hand_over_loop())
            return True
        await self.hand_over()
        return self.failing is None

    async def hand_over(self) -> None:
        """Hand what waits to the writer now (``failing`` says why when it cannot take it); one hand-over at
        a time, so that entries go in order and once."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._hand_over()

    async def _hand_over(self) -> None:
        batch = self.pending[:self.bound]
        if not batch:
            return
        try:
            await asyncio.wait_for(self.writer.append_many.remote(batch), HANDOFF_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - whatever keeps the entries from the writer
            if self.failing is None:
                log.warning("the audit writer cannot take entries (%d waiting): %s", len(self.pending),
                            type(err).__name__)
            self.failing = f"{type(err).__name__}: {err}"[:300]
            return
        del self.pending[:len(batch)]
        if self.failing is not None:
            log.warning("the audit writer takes entries again")
        self.failing, self.heard = None, self.clock()

    async def _hand_over_loop(self) -> None:
        while self.pending:
            await asyncio.sleep(self.period_s if self.failing is None else 10 * self.period_s)
            await self.hand_over()
