"""Hash chains: the one tamper-evidence mechanism of both audit logs (alias moves, serving.governance.audit, and
queries, serving.governance.query_log).

An entry is a JSON object with ``seq`` (1, 2, ...), ``prev_sha256`` (the previous entry's ``sha256``;
64 zeros for the first) and ``sha256``, the sha256 of its canonical bytes: the JSON of every field but
``sha256``, keys sorted, no spaces (``canonical_bytes``). Editing an entry breaks its own hash; deleting
one leaves a gap in ``seq`` and breaks the next entry's link; re-hashing an edited entry breaks the link
of the one after it. Only cutting entries off the end leaves a whole chain: a log that must catch that
keeps its head (the last ``seq`` and ``sha256``) elsewhere, as the query log does.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable

ZERO_SHA256 = "0" * 64
SEQ_DIGITS = 6


def canonical_bytes(entry: dict) -> bytes:
    """The bytes an entry's sha256 is taken over: every field but ``sha256``, sorted keys, no spaces."""
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_sha256(entry: dict) -> str:
    return hashlib.sha256(canonical_bytes(entry)).hexdigest()


def seal(body: dict, seq: int, prev_sha256: str) -> dict:
    """``body`` as entry ``seq`` of a chain whose previous entry has ``prev_sha256``."""
    entry = {**body, "seq": seq, "prev_sha256": prev_sha256}
    entry["sha256"] = entry_sha256(entry)
    return entry


def chain_problems(entries: Iterable[tuple[str, dict | str]]) -> tuple[list[str], int, str | None]:
    """Check a chain given as (where, entry) pairs in order, ``entry`` being the parsed object or, for one
    that did not parse, the reason as a string. Returns (problems, the last seq seen, its sha256).

    Problems, one line each, prefixed by ``where``: an unparseable entry, an edited one (its content no
    longer has its sha256), a gap in ``seq`` (entries deleted), a broken link (``prev_sha256`` is not the
    previous entry's sha256).
    """
    problems: list[str] = []
    expected_seq, prev_sha, last_seq = 1, ZERO_SHA256, 0
    for where, entry in entries:
        if not isinstance(entry, dict):
            problems.append(f"{where}: unparseable entry ({entry})")
            expected_seq, prev_sha = expected_seq + 1, None  # the next link cannot be checked
            continue
        seq = entry.get("seq")
        if isinstance(seq, int) and seq != expected_seq:
            problems.append(f"{where}: gap in the log, entries {expected_seq:0{SEQ_DIGITS}d}.."
                            f"{seq - 1:0{SEQ_DIGITS}d} are missing" if seq > expected_seq + 1 else
                            f"{where}: gap in the log, entry {expected_seq:0{SEQ_DIGITS}d} is missing"
                            if seq > expected_seq else f"{where}: seq {seq} repeats or goes back")
        actual = entry_sha256(entry)
        if entry.get("sha256") != actual:
            problems.append(f"{where}: edited: its content has sha256 {actual[:12]}..., the entry records "
                            f"{str(entry.get('sha256'))[:12]}...")
        if prev_sha is not None and entry.get("prev_sha256") != prev_sha:
            problems.append(f"{where}: broken link: prev_sha256 {str(entry.get('prev_sha256'))[:12]}... is not "
                            f"the sha256 {prev_sha[:12]}... of the entry before it")
        expected_seq = (seq if isinstance(seq, int) else expected_seq) + 1
        prev_sha, last_seq = actual, expected_seq - 1
    return problems, last_seq, prev_sha
