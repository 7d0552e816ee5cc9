"""The audit log of alias moves: append-only, one JSON file per entry, each hash-chained to the one before.

Layout, on the artifact root (a folder or ``s3://``, serving.storage): ``audit/<model name>/<seq>.json``
with ``seq`` zero-padded to six digits from ``000001``. An entry:

    {"seq": 3, "time": "2025-01-01T12:00:00+00:00", "actor": "ana@host", "action": "promote",
     "alias": "champion", "from_version": "2", "to_version": "3", "gates": [{"name", "passed",
     "detail", "figures"}], "figures": {...}, "reason": "...", "prev_sha256": "<hex>", "sha256": "<hex>"}

The chain is serving.governance.chain's (the query log uses the same): an entry's ``sha256`` is the sha256 of its
canonical bytes, ``prev_sha256`` the previous entry's (64 zeros for the first); editing an entry breaks
its own hash, deleting one breaks the next one's link and leaves a gap in ``seq``. Entries are created with
``ArtifactRoot.create_bytes`` (exclusive), so two writers can never both append entry N: the loser
reads the log again and appends on top of the winner's entry.

Actions that move the alias: ``promote`` (every gate passed), ``force-promote`` (gates failed, moved anyway
with a reason), ``rollback`` (by a person) and ``auto-rollback`` (by the serving controller). Actions that
record what serving did after a move (serving/lifecycle/follow.py): ``rollout`` (an arm that follows the
alias switched from ``from_version`` to ``to_version``) and ``rollout-failed`` (it could not; ``reason``
says why).
"""
from __future__ import annotations

import getpass
import json
import os
import re
import socket
from datetime import datetime, timezone

from serving.governance.chain import SEQ_DIGITS, ZERO_SHA256, canonical_bytes, chain_problems, entry_sha256, seal
from serving.storage import ArtifactRoot, open_root

__all__ = ["AuditLog", "AuditError", "ZERO_SHA256", "canonical_bytes", "entry_sha256", "default_root",
           "default_actor"]

AUDIT_PREFIX = "audit"
MOVES = ("promote", "force-promote", "rollback", "auto-rollback")
ACTIONS = (*MOVES, "rollout", "rollout-failed")
MAX_APPEND_TRIES = 100  # other writers that may win the same number before an append gives up
DEFAULT_ROOT = "./terrahash-root"
FIELDS = ("seq", "time", "actor", "action", "alias", "from_version", "to_version", "gates", "figures", "reason",
          "prev_sha256")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_ENTRY = re.compile(r"(\d{%d,})\.json" % SEQ_DIGITS)


class AuditError(RuntimeError):
    """An audit log that cannot be appended to or read as asked."""


def default_root(root: str | None = None) -> str:
    """The artifact root of the audit log: the argument, else $TERRAHASH_ROOT, else ./terrahash-root."""
    return root or os.environ.get("TERRAHASH_ROOT") or DEFAULT_ROOT


def default_actor(actor: str | None = None) -> str:
    """Who acts: the argument, else $TERRAHASH_ACTOR, else user@host."""
    if actor:
        return actor
    if os.environ.get("TERRAHASH_ACTOR"):
        return os.environ["TERRAHASH_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class AuditLog:
    """The audit log of one registered model on an artifact root (a folder, ``s3://`` URI or ArtifactRoot)."""

    def __init__(self, root: str | ArtifactRoot | None, name: str):
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"model name {name!r} cannot name an audit log (letters, digits, '.', '_', '-')")
        self.root = root if isinstance(root, ArtifactRoot) else open_root(default_root(root))
        self.name = name
        self.prefix = f"{AUDIT_PREFIX}/{name}"

    def key(self, seq: int) -> str:
        return f"{self.prefix}/{seq:0{SEQ_DIGITS}d}.json"

    def _files(self) -> list[tuple[int, str]]:
        """(seq, key) of every entry file, by seq."""
        found = []
        for key in self.root.list(f"{self.prefix}/"):
            name = key.rsplit("/", 1)[-1]
            match = _ENTRY.fullmatch(name)
            if key.count("/") == 2 and match:
                found.append((int(match.group(1)), key))
        return sorted(found)

    def entries(self) -> list[dict]:
        """Every entry, oldest first. An unreadable file is an AuditError naming it (``verify`` reports
        it instead)."""
        entries = []
        for seq, key in self._files():
            try:
                entries.append(json.loads(self.root.read_bytes(key)))
            except (ValueError, UnicodeDecodeError) as err:
                raise AuditError(f"{self.root.uri}/{key}: not a readable audit entry ({err}); "
                                 f"`terrahash history {self.name} --verify` checks the log") from None
        return entries

    def append(self, **fields) -> dict:
        """Append an entry (``action``, ``alias``, ``from_version``, ``to_version``, and optionally
        ``gates``, ``figures``, ``reason``, ``actor``, ``time``) on top of the latest one; returns it
        with its ``seq``, ``prev_sha256`` and ``sha256``. Another writer that takes the same number
        first makes this one read the log again and append after it."""
        unknown = set(fields) - set(FIELDS) - {"sha256"}
        if unknown or {"seq", "prev_sha256", "sha256"} & set(fields):
            raise ValueError(f"audit entry fields {sorted(unknown | ({'seq', 'prev_sha256', 'sha256'} & set(fields)))} "
                             f"cannot be given; known: {[f for f in FIELDS if f not in ('seq', 'prev_sha256')]}")
        if fields.get("action") not in ACTIONS:
            raise ValueError(f"audit action must be one of {list(ACTIONS)}, got {fields.get('action')!r}")
        if not fields.get("alias"):
            raise ValueError("an audit entry names the alias it moved")
        body = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "gates": [], "figures": {},
                "reason": None, "from_version": None, **fields, "actor": default_actor(fields.get("actor"))}
        for version in ("from_version", "to_version"):
            body[version] = None if body.get(version) is None else str(body[version])
        for _ in range(MAX_APPEND_TRIES):
            files = self._files()
            if files:
                seq, key = files[-1]
                try:
                    previous = json.loads(self.root.read_bytes(key))
                except (ValueError, UnicodeDecodeError) as err:
                    raise AuditError(f"{self.root.uri}/{key}: the latest audit entry is unreadable ({err}); "
                                     f"nothing appended") from None
                prev_sha = entry_sha256(previous)
            else:
                seq, prev_sha = 0, ZERO_SHA256
            entry = seal(body, seq + 1, prev_sha)
            try:
                self.root.create_bytes(self.key(seq + 1), json.dumps(entry, indent=2, sort_keys=True).encode())
                return entry
            except FileExistsError:
                continue  # another writer appended entry seq + 1 first: go on top of it
        raise AuditError(f"{self.root.uri}/{self.prefix}: {MAX_APPEND_TRIES} other writers appended first; try again")

    def verify(self) -> list[str]:
        """Every problem of the chain, one line each (an empty list: the log is whole): an unreadable
        file, an entry whose content no longer has its sha256 (edited), a seq that is not its file's, a
        gap in the numbers (deleted), a ``prev_sha256`` that is not the previous entry's (broken link)."""
        problems, read = [], []
        for seq, key in self._files():
            where = f"{self.root.uri}/{key}"
            try:
                entry = json.loads(self.root.read_bytes(key))
                if not isinstance(entry, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as err:
                read.append((where, str(err)))
                continue
            if entry.get("seq") != seq:
                problems.append(f"{where}: records seq {entry.get('seq')!r}, its file name says {seq}")
            read.append((where, entry))
        return chain_problems(read)[0] + problems

    def latest(self, alias: str) -> dict | None:
        """The latest entry that moved ``alias`` (None if it never moved)."""
        moves = self.moves(alias)
        return moves[-1] if moves else None

    def moves(self, alias: str | None = None) -> list[dict]:
        """The entries that moved an alias (``alias``, or any), oldest first: not the roll-outs that followed."""
        return [e for e in self.entries() if e.get("action") in MOVES and alias in (None, e.get("alias"))]

    def previous_version(self, alias: str) -> str | None:
        """The version ``alias`` held before its latest move, from the log (None: it was unset, or never moved)."""
        latest = self.latest(alias)
        return None if latest is None else latest.get("from_version")

    def held(self, alias: str, version) -> bool:
        """Whether ``version`` was ever moved to ``alias``, by the log."""
        return any(e.get("to_version") == str(version) for e in self.moves(alias))
