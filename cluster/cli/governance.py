"""``terrahash keys``, ``terrahash audit`` and ``terrahash policy``: API keys and their roles, the audit trail
of queries, and the query-template rules of a running app (serving.governance.keys, serving.governance.query_log,
serving.governance.policy). Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

KEYS_ENV, AUDIT_ENV = "TERRAHASH_KEYS", "TERRAHASH_AUDIT_LOG"


def default_keys(path: str | None) -> str:
    """The key file: the argument, else $TERRAHASH_KEYS, else auth/keys.json in the default artifact root."""
    from serving.governance.audit import default_root

    return path or os.environ.get(KEYS_ENV) or f"{default_root().rstrip('/')}/auth/keys.json"


def default_log(path: str | None) -> str:
    from serving.governance.audit import default_root

    return path or os.environ.get(AUDIT_ENV) or f"{default_root().rstrip('/')}/audit/queries.jsonl"


def _create(args: argparse.Namespace) -> int:
    from serving.governance.keys import KeyFile

    where = default_keys(args.keys)
    key = KeyFile(where).create(args.name, args.role, rate=args.rate, burst=args.burst)
    print(key, flush=True)  # alone on stdout: KEY=$(terrahash keys create ...)
    print(f"created key {args.name!r} (role {args.role}) in {where}; it is shown only this once, keep it secret. "
          f"Send it as 'Authorization: Bearer KEY'.", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from serving.governance.keys import KeyFile

    keys = KeyFile(default_keys(args.keys)).list()
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    print(f"{'name':<20}{'role':<12}{'id':<10}{'created':<27}{'revoked':<27}rate/burst")
    for k in keys:
        limits = f"{k['rate']:g}/{k['burst']:g}" if k.get("rate") and k.get("burst") else "default"
        print(f"{k['name']:<20}{k['role']:<12}{k['id']:<10}{k['created']:<27}{k.get('revoked') or '-':<27}{limits}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from serving.governance.keys import KeyFile

    where = default_keys(args.keys)
    count = KeyFile(where).revoke(args.name)
    print(f"revoked {count} key(s) named {args.name!r} in {where}; routers stop accepting them within their "
          f"auth.keys_reload_s", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from serving.governance.query_log import AuditError, QueryLog

    path = default_log(args.log)
    try:
        problems, entries = QueryLog(path).verify()
    except AuditError as err:
        print(f"terrahash audit verify: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    print(f"{path}: {entries} entries, " + ("chain intact" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _query(args: argparse.Namespace) -> int:
    from serving.governance.query_log import QueryLog, parse_time

    path = default_log(args.log)
    entries = QueryLog(path).query(key=args.key, since=parse_time(args.since) if args.since else None,
                                   until=parse_time(args.until) if args.until else None, decision=args.decision)
    if args.json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return 0
    for e in entries:
        print(f"{e['seq']:>8}  {e['time']}  {e.get('key') or '-':<16}{e.get('role') or '-':<11}{e['endpoint']:<10}"
              f"{e['status']:>4}  {e['decision']:<24}results {e.get('results') if e.get('results') is not None else '-'}"
              f"  arm {e.get('arm') or '-'}")
    print(f"{len(entries)} entries", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    from serving.governance.policy import load_policy

    policy = load_policy(args.file)
    for role, rules in policy.get("roles", {}).items():
        print(f"{role}: {len(rules.get('rules', []))} rule(s), default {rules.get('default', 'allow')}: "
              + ", ".join(f"{r['id']} ({r['effect']})" for r in rules.get("rules", [])))
    print(f"coarsening: {policy['coarsening']}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from cluster.cli.traffic import _connect
    from serving.lifecycle.control import update_access
    from serving.governance.policy import load_policy

    policy = load_policy(args.file)
    _connect(args.address)
    update_access(args.app, lambda access: {**access, "policy": policy})
    print(f"applied {args.file} to app {args.app!r}: every router replica is reconfigured in place")
    return 0


def add_governance_commands(subparsers) -> None:
    """Add ``keys``, ``audit`` and ``policy`` to the ``terrahash`` subcommands."""
    key_file = argparse.ArgumentParser(add_help=False)
    key_file.add_argument("--keys", metavar="FILE",
                          help=f"the key file: a path or s3://bucket/key (default: ${KEYS_ENV}, else "
                               f"<$TERRAHASH_ROOT or ./terrahash-root>/auth/keys.json)")
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys",
                                 description="API keys of the search service, stored only as salted hashes. "
                                             "Roles: restricted, reader, operator, admin (README: Security and "
                                             "governance). Serving reads the same file (auth.keys).")
    verbs = keys.add_subparsers(dest="verb", required=True, metavar="VERB")
    create = verbs.add_parser("create", parents=[key_file], help="a new key, printed once, alone on stdout")
    create.add_argument("name", metavar="NAME", help="who holds the key (a person or a service)")
    create.add_argument("--role", required=True, choices=("restricted", "reader", "operator", "admin"))
    create.add_argument("--rate", type=float, help="this key's requests per second (default: the deployment's)")
    create.add_argument("--burst", type=float, help="this key's burst (default: the deployment's)")
    create.set_defaults(handler=_create)
    listing = verbs.add_parser("list", parents=[key_file], help="names, roles, ids and times; never a key")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)
    revoke = verbs.add_parser("revoke", parents=[key_file], help="revoke every live key named NAME")
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(handler=_revoke)

    log_arg = argparse.ArgumentParser(add_help=False)
    log_arg.add_argument("log", metavar="LOG", nargs="?",
                         help=f"the query log (default: ${AUDIT_ENV}, else "
                              f"<$TERRAHASH_ROOT or ./terrahash-root>/audit/queries.jsonl)")
    audit = subparsers.add_parser("audit", help="check and read the audit trail of queries",
                                  description="The audit trail the search service writes (audit.log): one "
                                              "hash-chained JSON line per request.")
    verbs = audit.add_subparsers(dest="verb", required=True, metavar="VERB")
    verify = verbs.add_parser("verify", parents=[log_arg], help="check the chain: exit 1 when broken",
                              description="Checks every entry's hash, the links and the numbering, and the head "
                                          "file against the last entry; prints each problem and the number of "
                                          "entries. Exit 0: intact; 1: broken; 2: no log.")
    verify.set_defaults(handler=_verify)
    query = verbs.add_parser("query", parents=[log_arg], help="entries by key, time and decision")
    query.add_argument("--key", metavar="NAME", help="only this key's requests")
    query.add_argument("--since", metavar="TIME", help="ISO 8601 (2026-01-01T12:00Z) or back from now: 90s, 15m, 2h, 7d")
    query.add_argument("--until", metavar="TIME", help="as --since")
    query.add_argument("--decision", help="allowed, denied (any rule), denied:RULE, rate_limited, unauthenticated, "
                                          "forbidden, rejected")
    query.add_argument("--json", action="store_true", help="JSON lines, as stored")
    query.set_defaults(handler=_query)

    policy = subparsers.add_parser("policy", help="check a policy file, or apply it to a running app",
                                   description="Query-template rules per role and the coarsening of restricted "
                                               "answers (serving/policy.yaml is the shipped example).")
    verbs = policy.add_subparsers(dest="verb", required=True, metavar="VERB")
    check = verbs.add_parser("check", help="validate a policy file and list its rules")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_check)
    apply = verbs.add_parser("apply", help="replace a running app's policy in place (no restart)")
    apply.add_argument("file", metavar="FILE")
    apply.add_argument("--app", default="terrahash", help="the router's Serve application (default: terrahash)")
    apply.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else the local one)")
    apply.set_defaults(handler=_apply)
