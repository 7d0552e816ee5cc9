"""Alias moves of registered model versions behind the promotion gates (serving/lifecycle/gates.py), each move
written to the audit log.

An alias (``challenger``, ``champion``, ...) of the registered model ``terrahash-students`` names
the version serving should run. ``promote`` moves an alias to a version only if every gate passes
(``check_gates``), or when forced with a reason; ``rollback`` moves it back to the version it held
before its latest move. Every move appends an entry to the audit log (serving/governance/audit.py) and every
gate check is written to the version's tags (``gate.<name>``, ``gate.checked``), so MLflow's UI
shows why a version was or was not promoted.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from serving.governance.audit import AuditLog
from serving.lifecycle.gates import Gate, GateConfig, _current_holder, _now, check_gates
from serving.model.registry import client


log = logging.getLogger(__name__)


TAG_LIMIT = 5000  # MLflow's longest model version tag value


class PromotionRefused(RuntimeError):
    """A promotion that a gate refused; ``gates`` holds every gate's verdict."""

    def __init__(self, name: str, version: str, alias: str, gates: list[Gate]):
        self.gates = gates
        self.failed = [g.name for g in gates if not g.passed]
        super().__init__(f"{name} version {version} not promoted to {alias!r}: gate(s) {', '.join(self.failed)} "
                         f"failed: " + "; ".join(f"{g.name}: {g.detail}" for g in gates if not g.passed))


def _clip(text: str) -> str:
    return text if len(text) <= TAG_LIMIT else text[:TAG_LIMIT - 3] + "..."


def _move(mlflow_client, name: str, alias: str, version: str | None) -> None:
    """Point ``alias`` at ``version`` (None: remove it)."""
    if version is None:
        mlflow_client.delete_registered_model_alias(name, alias)
    else:
        mlflow_client.set_registered_model_alias(name, alias, str(version))


def _move_and_log(mlflow_client, audit: AuditLog, name: str, alias: str, from_version, to_version: str,
                  **entry) -> dict:
    """Move the alias, then append the audit entry; if the log cannot be written the alias is put back,
    so no move goes unrecorded."""
    _move(mlflow_client, name, alias, to_version)
    try:
        written = audit.append(alias=alias, from_version=from_version, to_version=to_version, **entry)
    except BaseException:
        log.error("the audit log at %s could not be written: moving %r back to %s", audit.root.uri, alias, from_version)
        _move(mlflow_client, name, alias, from_version)
        raise
    mlflow_client.set_model_version_tag(name, to_version, f"alias.{alias}.since", written["time"])
    return written


def promote(name: str, version, alias: str, *, root=None, tracking_uri: str | None = None,
            config: GateConfig | None = None, force: bool = False, reason: str | None = None,
            actor: str | None = None, model_cache: str | Path | None = None) -> dict:
    """Move ``alias`` of ``name`` to ``version`` if every gate passes; returns the audit entry.

    The gates' verdicts are written to the version's tags first (``gate.<name>``: "passed: ..." or
    "failed: ...", ``gate.checked``). Refused: PromotionRefused carrying the gates, nothing moved.
    ``force`` (with a non-empty ``reason``) moves it anyway, recorded as ``force-promote`` with the
    reason and the failed gates. The version is tagged ``alias.<alias>.since``."""
    if force and not (reason and reason.strip()):
        raise ValueError("a forced promotion needs a reason (--reason TEXT): it is recorded in the audit log")
    config = config or GateConfig()
    version = str(version)
    mlflow_client = client(tracking_uri)
    holder = _current_holder(mlflow_client, name, alias)
    from_version = None if holder is None else str(holder.version)
    if from_version == version:
        raise ValueError(f"{name} version {version} already holds alias {alias!r}")
    gates = check_gates(name, version, alias, root=root, tracking_uri=tracking_uri, config=config,
                        model_cache=model_cache)
    checked = _now()
    for gate in gates:
        mlflow_client.set_model_version_tag(name, version, f"gate.{gate.name}",
                                            _clip(f"{'passed' if gate.passed else 'failed'}: {gate.detail}"))
    mlflow_client.set_model_version_tag(name, version, "gate.checked", checked)
    failed = [g for g in gates if not g.passed]
    if failed and not force:
        raise PromotionRefused(name, version, alias, gates)
    figures = {g.name: g.figures for g in gates if g.figures}
    return _move_and_log(mlflow_client, AuditLog(root, name), name, alias, from_version, version,
                         action="force-promote" if failed else "promote", gates=[asdict(g) for g in gates],
                         figures=json.loads(json.dumps(figures, default=str)), reason=reason, actor=actor)


def rollback(name: str, alias: str, *, root=None, reason: str, tracking_uri: str | None = None,
             actor: str | None = None, automatic: bool = False, figures: dict | None = None) -> dict:
    """Move ``alias`` back to the version it held before its latest move (by the audit log); returns
    the ``rollback`` (or, with ``automatic``, ``auto-rollback``) entry. ``figures``: what the decision
    was made on (the serving controller's canary figures). The version rolled back from is tagged
    ``canary.status = rolled_back``. ValueError when the log records no earlier holder."""
    if not (reason and reason.strip()):
        raise ValueError("a rollback needs a reason: it is recorded in the audit log")
    audit = AuditLog(root, name)
    latest = audit.latest(alias)
    if latest is None:
        raise ValueError(f"the audit log at {audit.root.uri} records no move of {name}@{alias}: nothing to roll back to")
    target = latest.get("from_version")
    if target is None:
        raise ValueError(f"{name}@{alias} was unset before its latest move (entry {latest['seq']}, to version "
                         f"{latest['to_version']}): no earlier holder to roll back to")
    mlflow_client = client(tracking_uri)
    holder = _current_holder(mlflow_client, name, alias)
    current = None if holder is None else str(holder.version)
    if current != latest.get("to_version"):
        log.warning("%s@%s is version %s in the registry, but the audit log's latest move set it to %s",
                    name, alias, current, latest.get("to_version"))
    written = _move_and_log(mlflow_client, audit, name, alias, current, target,
                            action="auto-rollback" if automatic else "rollback", figures=dict(figures or {}),
                            reason=reason, actor=actor)
    if current is not None:
        mlflow_client.set_model_version_tag(name, current, "canary.status", "rolled_back")
    return written


def alias_problems(name: str, *, root=None, tracking_uri: str | None = None) -> list[str]:
    """Where the registry's aliases of ``name`` differ from the audit log's latest move of each
    (an alias moved outside terrahash, or the log's last entries lost)."""
    audit = AuditLog(root, name)
    mlflow_client = client(tracking_uri)
    aliases = dict(getattr(mlflow_client.get_registered_model(name), "aliases", {}) or {})
    logged = {}
    for entry in audit.moves():
        logged[entry.get("alias")] = entry.get("to_version")
    problems = []
    for alias in sorted(set(aliases) | set(logged)):
        now, recorded = aliases.get(alias), logged.get(alias)
        now = None if now is None else str(now)
        if now != recorded:
            problems.append(f"alias {alias!r} is version {now} in the registry, the audit log's latest move "
                            f"set it to {recorded}")
    return problems
