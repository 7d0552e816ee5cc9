"""Arms given by alias follow it: when ``models:/NAME@ALIAS`` names another version, serving rolls it out.

The canary controller (serving/lifecycle/canary.py) holds an ``AliasFollower`` and ticks it every interval.
Every ``alias_poll_s`` it asks the registry which version the alias of each arm declared by alias names.
When that differs from the version the arm serves (its route's ``serving``; before the first roll-out,
what every router replica reports), the roll-out:

1. points the arm at the version (serving.lifecycle.control.roll_out): each router replica loads it beside
   the old one (the split layout: its own model application) and switches as soon as it is ready,
   answering with the old one meanwhile (serving.runtime.arms), so no request fails;
2. waits until every running router replica reports serving it (``rollout_timeout_s``);
3. records since when the arm serves it, stops what no arm uses any more, and appends a ``rollout``
   entry to the model's audit log (serving/governance/audit.py) naming the alias move it follows.

A version the routers cannot load (another code space, files missing) is never switched to: the arm
keeps serving the old one, its route is put back, a ``rollout-failed`` entry gives the routers' reason,
and that version is not tried again until the alias names another. An automatic rollback moves the alias
back (canary.py); the arm follows it here like any other move.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Callable

log = logging.getLogger("ray.serve")

LIVE_REPORT_S = 5.0  # a router replica heard from within this long is running


def alias_target(model: str | None) -> tuple[str, str] | None:
    """(name, alias) of an arm's model given as ``models:/NAME@ALIAS``; None for a version or a folder."""
    from serving.model.registry import parse_model_uri

    parsed = parse_model_uri(model) if model else None
    return None if parsed is None or parsed[2] is None else (parsed[0], parsed[2])


def alias_version(name: str, alias: str, tracking_uri: str | None) -> str:
    """``models:/NAME/VERSION`` the alias names now (the registry's answer)."""
    from serving.model.registry import client

    return f"models:/{name}/{client(tracking_uri).get_model_version_by_alias(name, alias).version}"


def running_routers(app_name: str) -> int:
    from ray import serve

    router = serve.status().applications[app_name].deployments["Router"]
    return int(router.replica_states.get("RUNNING", 0))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AliasFollower:
    """Rolls out the version an arm's alias moves to (see the module docstring). ``reports()`` gives what each
    live router replica serves per arm ({replica: {arm: serving.runtime.arms.Arm.serving()}});
    ``on_switched(arm)`` is called once every router serves the new version."""

    def __init__(self, app_name: str, tracking_uri: str | None, reports: Callable[[], dict],
                 on_switched: Callable[[str], None] = lambda arm: None):
        self.app_name, self.tracking_uri = app_name, tracking_uri
        self.reports, self.on_switched = reports, on_switched
        self.rollouts: dict[str, dict] = {}  # arm -> its latest roll-out: from, to, state, times, problem
        self.failed: dict[str, str] = {}  # arm -> the version that could not be rolled out (not tried again)
        self.problems: dict[str, str] = {}  # arm -> why its alias could not be read
        self._task: asyncio.Task | None = None
        self._last = 0.0

    def tick(self, traffic, config) -> None:
        """Start a check of every arm when one is due and none is running (roll-outs run in that check)."""
        if not config.follow_aliases or traffic is None or (self._task is not None and not self._task.done()):
            return
        if time.monotonic() - self._last < config.alias_poll_s:
            return
        self._last = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._check(traffic, config))

    def served(self, arm: str) -> dict:
        """{model: number of live router replicas serving it} for ``arm``."""
        counts: dict[str, int] = {}
        for serving in self.reports().values():
            model = (serving.get(arm) or {}).get("model")
            counts[str(model)] = counts.get(str(model), 0) + 1
        return counts

    async def _check(self, traffic, config) -> None:
        from serving.lifecycle.control import roll_out

        for arm in traffic.arms:
            target = alias_target(arm.model)
            if target is None:
                continue
            try:
                version = await asyncio.to_thread(alias_version, *target, self.tracking_uri)
                self.problems.pop(arm.name, None)
            except Exception as err:  # noqa: BLE001 - the registry is down or the alias gone: keep serving
                problem = f"{target[0]}@{target[1]}: {type(err).__name__}: {err}"
                if self.problems.get(arm.name) != problem:
                    log.warning("arm %s: cannot read its alias: %s", arm.name, problem)
                self.problems[arm.name] = problem
                continue
            served = arm.serving
            if served is None:  # not pinned yet: what the routers resolved the alias to when they loaded it
                counts = self.served(arm.name)
                if not counts or "None" in counts:
                    continue  # not every router has loaded the arm yet: asked again next time
                if list(counts) == [version]:  # pin it to that version: nothing to load
                    await asyncio.to_thread(roll_out, self.app_name, arm.name, version, _now(), False)
                    continue
                served = ",".join(sorted(counts))
            if served == version and arm.name not in self.rollouts and set(self.served(arm.name)) - {version, "None"}:
                # a roll-out this controller started before it restarted: see it through
                await self._roll_out(arm, target, None, version, config, resume=True)
            if served == version or self.failed.get(arm.name) == version:
                continue
            self.failed.pop(arm.name, None)
            await self._roll_out(arm, target, served, version, config)

    async def _roll_out(self, arm, target: tuple[str, str], served: str | None, version: str, config,
                        resume: bool = False) -> None:
        from serving.lifecycle.control import restore_arm, roll_out, settle_roll_out

        name, alias = target
        record = {"from": served, "to": version, "state": "rolling out", "started": _now(), "finished": None,
                  "problem": None}
        self.rollouts[arm.name] = record
        log.info("arm %s: %s@%s moved to %s: rolling it out (serving %s)", arm.name, name, alias, version, served)
        start = time.monotonic()
        before = arm.model_dump(mode="json")
        try:
            if not resume:
                await asyncio.to_thread(roll_out, self.app_name, arm.name, version, record["started"])
            record["problem"] = await self._wait_switched(arm.name, version, start + config.rollout_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the Serve config could not change: nothing switched
            record["problem"] = f"{type(err).__name__}: {err}"
        record["finished"], seconds = _now(), round(time.monotonic() - start, 1)
        done = record["problem"] is None
        if done:
            log.info("arm %s: now serves %s (%.1f s)", arm.name, version, seconds)
            self.on_switched(arm.name)
        else:
            self.failed[arm.name] = version
            log.error("arm %s: roll-out of %s failed, still serving %s: %s", arm.name, version, served,
                      record["problem"])
        try:  # since when it serves it, and what no arm uses any more stopped; or the route put back
            await asyncio.to_thread(*((settle_roll_out, self.app_name, arm.name, record["finished"]) if done
                                      else (restore_arm, self.app_name, before)))
        except Exception as err:  # noqa: BLE001 - the routers serve what they serve; say what was not recorded
            log.error("arm %s: the split could not be updated after the roll-out: %s", arm.name, err)
            record["split"] = f"not updated: {err}"
        await asyncio.to_thread(self._audit, arm.name, name, alias, record, seconds, config.root, done)
        record["state"] = "done" if done else "failed"  # last: the audit entry is written by then

    async def _wait_switched(self, arm: str, version: str, deadline: float) -> str | None:
        """None once every running router replica serves ``version`` on ``arm``; else why not (a version
        the routers found unusable, or the time out)."""
        while True:
            reports = self.reports()
            mine = [serving.get(arm) or {} for serving in reports.values()]
            running = await asyncio.to_thread(running_routers, self.app_name)
            if mine and len(mine) >= running and all(s.get("model") == version and not s.get("staged") for s in mine):
                return None
            unusable = [s["problem"] for s in mine if s.get("staged") and s.get("unusable")]
            if unusable:
                return f"the routers cannot serve {version}: {unusable[0]}"
            if time.monotonic() > deadline:
                problems = sorted({s["problem"] for s in mine if s.get("problem")})
                return ("not served by every router within the roll-out timeout: "
                        + ("; ".join(problems) or "no reason given"))
            await asyncio.sleep(0.5)

    def _audit(self, arm: str, name: str, alias: str, record: dict, seconds: float, root: str | None,
               done: bool) -> None:
        """A ``rollout`` (or ``rollout-failed``) entry, after the alias move it follows."""
        from serving.governance.audit import AuditLog

        def number(model: str | None) -> str | None:
            return model.rsplit("/", 1)[1] if model and model.startswith(f"models:/{name}/") else model

        try:
            audit = AuditLog(root, name)
            move = audit.latest(alias)
            audit.append(action="rollout" if done else "rollout-failed", alias=alias,
                         from_version=number(record["from"]), to_version=number(record["to"]),
                         reason=record["problem"] or f"arm {arm} of {self.app_name} follows {name}@{alias}",
                         figures={"arm": arm, "app": self.app_name, "seconds": seconds, "started": record["started"],
                                  "finished": record["finished"], "after_seq": move and move.get("seq")})
        except Exception as err:  # noqa: BLE001 - the roll-out stands; say that its entry is missing
            log.error("arm %s: roll-out not written to the audit log: %s", arm, err)
            record["audit"] = f"not written: {err}"
