"""``terrahash promote``, ``terrahash rollback`` and ``terrahash history``: thin layers over serving.lifecycle.promotion
and serving.governance.audit (model versions in the MLflow registry, alias moves behind gates, the audit log).

Nothing heavy is imported until a subcommand runs, and nothing here imports torch.
"""
from __future__ import annotations

import argparse
import json
import sys


def _common(args: argparse.Namespace) -> dict:
    from serving.model.registry import quiet_mlflow

    quiet_mlflow()
    return {"root": args.root, "tracking_uri": args.tracking_uri}


def _promote(args: argparse.Namespace) -> int:
    from serving.lifecycle.gates import load_gate_config
    from serving.lifecycle.promotion import PromotionRefused, promote

    where = _common(args)
    config = load_gate_config(args.gates)
    try:
        entry = promote(args.name, args.version, args.alias, config=config, force=args.force, reason=args.reason,
                        actor=args.actor, **where)
    except PromotionRefused as refused:
        for gate in refused.gates:
            print(gate.line())
        print(f"refused: {args.name} version {args.version} not promoted to {args.alias!r}; failed gate(s): "
              f"{', '.join(refused.failed)} (`--force --reason TEXT` overrides, and is recorded)", file=sys.stderr)
        return 1
    for gate in entry["gates"]:
        print(f"{'PASS' if gate['passed'] else 'FAIL'} {gate['name']:<7} {gate['detail']}")
    forced = " (forced: " + entry["reason"] + ")" if entry["action"] == "force-promote" else ""
    print(f"{entry['action']}: {args.name}@{args.alias} {entry['from_version']} -> {entry['to_version']}{forced}; "
          f"audit entry {entry['seq']:06d}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from serving.lifecycle.promotion import rollback

    entry = rollback(args.name, args.alias, reason=args.reason, actor=args.actor, **_common(args))
    print(f"rollback: {args.name}@{args.alias} {entry['from_version']} -> {entry['to_version']}; "
          f"audit entry {entry['seq']:06d}")
    return 0


def format_entry(entry: dict) -> str:
    """One line of the log: seq, time, actor, action, alias, from -> to, reason."""
    reason = f"  ({entry['reason']})" if entry.get("reason") else ""
    failed = [g["name"] for g in entry.get("gates", []) if not g.get("passed")]
    forced = f"  failed gates: {', '.join(failed)}" if entry.get("action") == "force-promote" and failed else ""
    return (f"{entry.get('seq', 0):06d}  {entry.get('time')}  {entry.get('actor')}  {entry.get('action'):<13}  "
            f"{entry.get('alias')}: {entry.get('from_version')} -> {entry.get('to_version')}{reason}{forced}")


def _history(args: argparse.Namespace) -> int:
    from serving.governance.audit import AuditLog

    where = _common(args)
    audit = AuditLog(where["root"], args.name)
    problems = audit.verify() if args.verify else []
    if args.aliases:
        from serving.lifecycle.promotion import alias_problems

        problems += alias_problems(args.name, **where)
    if args.json:
        try:
            entries = audit.entries()
        except RuntimeError:  # an unparseable entry, among the problems
            entries = []
        print(json.dumps({"name": args.name, "root": audit.root.uri, "entries": entries, "problems": problems},
                         indent=2))
    else:
        try:
            entries = audit.entries()
        except RuntimeError as err:  # an unparseable entry: --verify lists it
            entries = []
            if not args.verify:
                raise ValueError(str(err)) from None
        if not entries and not problems:
            print(f"no audit entries for {args.name} under {audit.root.uri}")
        for entry in entries:
            print(format_entry(entry))
        if args.verify or args.aliases:
            for problem in problems:
                print(f"PROBLEM {problem}")
            print(f"audit log of {args.name} at {audit.root.uri}: "
                  f"{len(problems)} problem(s)" if problems else
                  f"audit log of {args.name} at {audit.root.uri}: {len(entries)} entries, chain intact")
    return 1 if problems else 0


def add_lifecycle_commands(subparsers) -> None:
    """Add ``promote``, ``rollback`` and ``history`` to the ``terrahash`` subcommands."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--root", metavar="URI",
                       help="artifact root holding the audit log (audit/<NAME>/): a folder or s3://bucket/prefix "
                            "(default: $TERRAHASH_ROOT, else ./terrahash-root)")
    where.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow tracking URI of the model registry (default: $MLFLOW_TRACKING_URI, else "
                            "./mlruns.db)")
    who = argparse.ArgumentParser(add_help=False)
    who.add_argument("--actor", help="who acts, for the audit log (default: $TERRAHASH_ACTOR, else user@host)")

    promote = subparsers.add_parser(
        "promote", parents=[where, who], help="move an alias to a model version, behind gates",
        description="Check the gates on moving ALIAS of registered model NAME to VERSION: spec (the specs agree "
                    "with each other and with the index), index (an index release built with the version "
                    "verifies), val (val mAP@all and mR not worse than the alias's current holder's), parity (val "
                    "bit agreement with the torch students, mAP relative to the teacher) and, for champion, canary "
                    "(it served as challenger and its canary is healthy). Prints each gate; moves the alias only if "
                    "all pass (exit 0), else exit 1 naming the failed gates. Every move is appended to the audit "
                    "log; every check is written to the version's tags (gate.*).")
    promote.add_argument("name", metavar="NAME", help="registered model, e.g. terrahash-students")
    promote.add_argument("version", metavar="VERSION", help="model version number")
    promote.add_argument("--alias", required=True, help="alias to move, e.g. challenger or champion")
    promote.add_argument("--force", action="store_true",
                         help="move the alias even if gates fail (needs --reason; recorded as force-promote with "
                              "the failed gates)")
    promote.add_argument("--reason", help="why: recorded in the audit log (required with --force)")
    promote.add_argument("--gates", metavar="FILE",
                         help="YAML file of gate thresholds (default: the shipped serving/promotion.yaml)")
    promote.set_defaults(handler=_promote)

    rollback = subparsers.add_parser(
        "rollback", parents=[where, who], help="move an alias back to its previous version",
        description="Move ALIAS of NAME back to the version it held before its latest move, as the audit log "
                    "records it, and append a rollback entry; the version rolled back from is tagged "
                    "canary.status=rolled_back.")
    rollback.add_argument("name", metavar="NAME", help="registered model")
    rollback.add_argument("--alias", required=True, help="alias to move back")
    rollback.add_argument("--reason", required=True, help="why: recorded in the audit log")
    rollback.set_defaults(handler=_rollback)

    history = subparsers.add_parser(
        "history", parents=[where], help="print (and verify) the audit log of a model's alias moves",
        description="Print the audit log of NAME: time, actor, action, alias, from -> to version, reason. "
                    "--verify checks the hash chain (an edited entry, a deleted one, a broken link, an unreadable "
                    "file) and exits 1 on any problem.")
    history.add_argument("name", metavar="NAME", help="registered model")
    history.add_argument("--verify", action="store_true", help="check the hash chain; exit 1 when it is broken")
    history.add_argument("--aliases", action="store_true",
                         help="also compare the registry's aliases with the log's latest moves (shows a move made "
                              "outside terrahash, or lost last entries); exit 1 when they differ")
    history.add_argument("--json", action="store_true", help="print the entries (and any problems) as JSON")
    history.set_defaults(handler=_history)

    card = subparsers.add_parser(
        "card", parents=[where], help="write (again) the model card of a registered version",
        description="Build the model card of version VERSION of NAME from its distillation run's metrics.json, its "
                    "teacher's and its own MLflow runs (parameters, energy and CO2) and the dataset (--data): JSON "
                    "and Markdown, logged with the version's files and set as its description. `terrahash distill` "
                    "writes one for every version it registers; this writes one for older versions.")
    card.add_argument("name", metavar="NAME", help="registered model")
    card.add_argument("version", metavar="VERSION", help="model version number")
    card.add_argument("--data", required=True, metavar="DIR", help="the dataset the version was made from")
    card.add_argument("--out", metavar="DIR", default=".", help="where to write the card files too (default: here)")
    card.set_defaults(handler=_card)


def _card(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from evaluation.model_card import CARD_MD, publish_card, write_card
    from serving.model.registry import client
    from serving.ingest.dataset import load_dataset

    _common(args)
    mlflow = client(args.tracking_uri)
    version = mlflow.get_model_version(args.name, args.version)
    with tempfile.TemporaryDirectory(prefix="terrahash-card-") as tmp:
        metrics = json.loads(Path(mlflow.download_artifacts(version.run_id, "metrics.json", tmp)).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = write_card(out, {**metrics, "mlflow_run_id": version.run_id}, load_dataset(args.data), args.name,
                      args.version, mlflow)
    source = version.source.rstrip("/").rsplit("/", 1)[-1]  # the folder of the run's artifacts it was made from
    publish_card(mlflow, args.name, args.version, out, version.run_id, source)
    observed = [m["name"] for m in card["failure_modes"] if m["observed"]]
    print(f"model card of {args.name} version {args.version}: {out / CARD_MD}; failure modes observed: "
          f"{', '.join(observed) or 'none'}")
    return 0
