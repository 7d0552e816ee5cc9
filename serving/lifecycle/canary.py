"""The canary controller: judges every arm over a sliding window and rolls a failing challenger back.

One replica (``Canary``, in the router's application). Its inputs:

* the routers' per-arm reports, every second (requests, errors, latencies, fallbacks; for shadow
  arms the overlap@k and rank correlation with the client's answer);
* probe queries it sends itself to every arm through the router (``Router.probe``), at ``probe_rate``
  per second per arm: held-out val captions and val images of a labelled dataset (``probe_data``;
  never the test split), scored by class relevance as mAP@k and recall@k.

Every ``interval_s`` each arm other than the primary that takes traffic (or mirrors it) is judged over
the last ``window_s`` (the plain functions of serving/lifecycle/judging.py): error rate above ``max_error_rate``, p99 above ``max_p99_ms`` (of client requests,
or of probes while client requests are too few to judge) or probe mAP@k below the primary's by more than ``max_probe_map_drop`` rolls it back (``auto_rollback``): its weight
goes to the primary (applied through the Serve config, serving/lifecycle/control.py), its registry alias moves
back to the version it held before (serving/lifecycle/promotion.py, with an entry in the audit log), and a metric
and a log line say why. Too few requests and too few probes is "no data yet": neither healthy nor
failing, and nothing is rolled back on it. Registered arms get their record written to their MLflow
model version (``canary.*`` tags) every ``record_every_s``, which the promotion to champion reads.

Arms given by alias follow it (serving/lifecycle/follow.py): when the alias moves, by a promotion, a person's
rollback or this controller's own, the arm rolls the version it now names out; the status says which
version each arm serves, since when, and how its latest roll-out went.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from ray import serve

from serving.lifecycle.follow import LIVE_REPORT_S, AliasFollower
from serving.lifecycle.judging import NO_DATA, Series, probe_scores, reason_tag, verdicts, window_figures
from serving.runtime.settings import CanaryConfig
from serving.runtime.traffic import Traffic, check_traffic

log = logging.getLogger("ray.serve")


def load_probes(data: str, count: int, seed: int = 0) -> dict:
    """Probe queries from the val split of a Karpathy-style dataset: ``count // 2`` captions and as many
    images (their bytes), and the class of every image of the dataset (relevance)."""
    from serving.ingest.items import dataset_items
    from serving.ingest.dataset import load_dataset

    items = dataset_items(data)
    labels = dict(zip(items.image_ids, items.labels))
    val = {str(r.path) for r in load_dataset(data, check_images=False).split("val")}
    val_ids = [i for i, p in zip(items.image_ids, items.image_paths) if p in val]
    if not val_ids:
        raise ValueError(f"{data}: the val split is empty: no probe queries")
    rng = np.random.default_rng(seed)
    paths = dict(zip(items.image_ids, items.image_paths))
    picked = [val_ids[i] for i in rng.permutation(len(val_ids))[:max(1, count // 2)]]
    val_captions = [(c, i) for c, i in zip(items.captions, items.caption_image_ids) if i in set(val_ids)]
    captions = [val_captions[i] for i in rng.permutation(len(val_captions))[:max(1, count - len(picked))]]
    queries = [{"kind": "text", "payload": text, "label": labels[image], "self": None} for text, image in captions]
    queries += [{"kind": "image", "payload": Path(paths[i]).read_bytes(), "label": labels[i], "self": i} for i in picked]
    order = rng.permutation(len(queries))  # captions and images interleaved
    return {"queries": [queries[i] for i in order], "labels": labels,
            "class_sizes": collections.Counter(labels.values())}


@serve.deployment(num_replicas=1, max_ongoing_requests=1000)
class Canary:
    """Per-arm figures, probes, verdicts and automatic rollback (see the module's docstring)."""

    def __init__(self, app_name: str, tracking_uri: str | None = None):
        from ray.serve.metrics import Counter, Gauge

        self.app_name, self.tracking_uri = app_name, tracking_uri
        self.router = serve.get_deployment_handle("Router", app_name)
        self.config: CanaryConfig | None = None
        self.traffic: Traffic | None = None
        self.live: dict[str, Series] = collections.defaultdict(Series)  # (t, ok, seconds, fallback)
        self.shadow: dict[str, Series] = collections.defaultdict(Series)  # (t, ok, seconds, overlap, rank)
        self.probes: dict[str, Series] = collections.defaultdict(Series)  # (t, ok, ap, recall, seconds)
        self.verdicts: dict[str, dict] = {}
        self.rollbacks: dict[str, dict] = {}
        self.models: dict[str, dict] = {}  # arm -> what its encoder serves (Router.arm_model)
        self.gates: dict[str, dict] = {}
        self.probe_set: dict | None = None
        self.routers: dict[str, tuple[float, int]] = {}  # router replica -> (last report, revision of its split)
        self.serving: dict[str, dict] = {}  # router replica -> what it serves per arm (arms.Arm.serving)
        self.follower = AliasFollower(app_name, tracking_uri, self._live_serving, on_switched=self._switched)
        self.probe_problem: str | None = None
        self._probe_source: str | None = None
        self._probe_next = 0
        self._probe_credit: dict[str, float] = collections.defaultdict(float)
        self._last_record = 0.0
        self._loop: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self.rollback_counter = Counter("terrahash_rollbacks", description="automatic rollbacks of an arm",
                                        tag_keys=("arm", "reason"))
        self.probe_gauge = Gauge("terrahash_probe_map", description="probe mAP@k of an arm over the window",
                                 tag_keys=("arm",))

    async def reconfigure(self, config: dict) -> None:
        config = dict(config)
        before = {a.name: a for a in self.traffic.arms} if self.traffic else {}
        self.traffic = check_traffic(config.pop("traffic"))
        self.config = CanaryConfig.model_validate(config)
        for arm in self.traffic.arms:
            old = before.get(arm.name)
            if old is not None and old.weight <= 0 < arm.weight or old is not None and old.fault != arm.fault \
                    or old is not None and (old.model_app, old.index_app) != (arm.model_app, arm.index_app):
                self._forget(arm.name)  # traffic again, or another backend: a new canary, judged afresh
            elif old is not None and old.serving and old.serving != arm.serving:
                self._forget(arm.name, keep_rollback_to=arm.serving)  # another version rolled out on it
        for name in [n for n in self.rollbacks if n not in {a.name for a in self.traffic.arms}]:
            self._forget(name)
        if self.config.probe_data != self._probe_source:
            self._probe_source, self.probe_set, self.probe_problem = self.config.probe_data, None, None
            if self.config.probe_data:
                try:
                    self.probe_set = await asyncio.to_thread(load_probes, self.config.probe_data,
                                                             self.config.probe_count)
                except Exception as err:  # noqa: BLE001 - say why in the status, keep judging the rest
                    self.probe_problem = f"probes from {self.config.probe_data}: {err}"
                    log.warning("%s", self.probe_problem)
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())

    def _forget(self, arm: str, keep_rollback_to: str | None = None) -> None:
        """Judge ``arm`` afresh; its rollback record stays when the arm now follows its alias back to the
        version the rollback moved it to (``keep_rollback_to``)."""
        for series in (self.live, self.shadow, self.probes):
            series.pop(arm, None)
        rollback = self.rollbacks.pop(arm, None)
        moved = (rollback or {}).get("alias")
        if keep_rollback_to and isinstance(moved, dict) and keep_rollback_to.endswith(f"/{moved.get('to')}"):
            self.rollbacks[arm] = rollback
        self.verdicts.pop(arm, None)
        self.models.pop(arm, None)

    def _live_serving(self) -> dict:
        """What each router replica heard from lately serves, per arm."""
        now = time.time()
        return {replica: self.serving.get(replica, {}) for replica, (seen, _) in self.routers.items()
                if now - seen < LIVE_REPORT_S}

    def _switched(self, arm: str) -> None:
        self.models.pop(arm, None)  # its registered version is asked again

    async def report(self, replica: str, report: dict) -> None:
        """A router replica's per-arm samples since its last report (serving.runtime.arms.ArmStats)."""
        now = time.time()
        self.routers[replica] = (now, int(report.get("revision", 0)))
        self.serving[replica] = report.get("serving", {})
        for kind, series in (("live", self.live), ("shadow", self.shadow)):
            for arm, samples in report.get(kind, {}).items():
                for sample in samples:
                    series[arm].add(now, *sample)

    async def revisions(self) -> dict[str, int]:
        """The revision of the split each router replica heard from in the last 5 s has."""
        now = time.time()
        return {replica: revision for replica, (seen, revision) in self.routers.items() if now - seen < LIVE_REPORT_S}

    async def status(self) -> dict:
        """Per arm: weight, share, requests, errors, p50/p99, probes, shadow figures, verdict, rollback, gates."""
        figures = self._figures(time.time())
        arms = {}
        for arm in (self.traffic.arms if self.traffic else []):
            f = figures.get(arm.name, {})
            arms[arm.name] = {**f, "weight": arm.weight, "shadow": arm.shadow, "alias": arm.alias,
                              "verdict": self.verdicts.get(arm.name, {"verdict": NO_DATA, "reasons": []}),
                              "rollback": self.rollbacks.get(arm.name), "gates": self.gates.get(arm.name),
                              "model": self.models.get(arm.name, {}).get("registered"),
                              "serving": {"model": arm.serving, "since": arm.since,
                                          "replicas": self.follower.served(arm.name),
                                          "alias_problem": self.follower.problems.get(arm.name)},
                              "rollout": self.follower.rollouts.get(arm.name)}
        return {"window_s": self.config.window_s if self.config else None, "arms": arms,
                "probes": {"source": self._probe_source, "count": len(self.probe_set["queries"]) if self.probe_set
                           else 0, "problem": self.probe_problem, "k": self.config.probe_k if self.config else None}}

    # --- the loop ---

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.follower.tick(self.traffic, self.config)
                if self.config.enabled:
                    self._send_probes()
                    await self._judge()
                    await self._record()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the controller must outlive any one tick
                log.exception("canary tick failed")
            await asyncio.sleep(max(0.05, self.config.interval_s - (time.monotonic() - started)))

    def _send_probes(self) -> None:
        if not self.probe_set or not self.config.probe_rate:
            return
        for arm in self.traffic.arms:
            if arm.name in self.rollbacks:
                continue
            self._probe_credit[arm.name] += self.config.probe_rate * self.config.interval_s
            while self._probe_credit[arm.name] >= 1:
                self._probe_credit[arm.name] -= 1
                query = self.probe_set["queries"][self._probe_next % len(self.probe_set["queries"])]
                self._probe_next += 1
                task = asyncio.get_running_loop().create_task(self._probe(arm.name, query))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _probe(self, arm: str, query: dict) -> None:
        k, start = self.config.probe_k, time.perf_counter()
        try:
            ids = await asyncio.wait_for(self.router.probe.remote(arm, query["kind"], query["payload"], k + 1),
                                         timeout=10.0)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failed probe counts against the arm
            self.probes[arm].add(time.time(), False, 0.0, 0.0, time.perf_counter() - start)
            return
        seconds = time.perf_counter() - start
        ids = [i for i in ids if i != query["self"]][:k]
        label = query["label"]
        ap, recall = probe_scores(ids, label, self.probe_set["labels"], self.probe_set["class_sizes"][label], k)
        self.probes[arm].add(time.time(), True, ap, recall, seconds)

    def _figures(self, now: float) -> dict:
        cutoff = now - (self.config.window_s if self.config else 60.0)
        return window_figures(self.traffic.arms if self.traffic else [], self.live, self.shadow, self.probes, cutoff)

    async def _judge(self) -> None:
        """The verdict on every arm over the window (serving.lifecycle.judging); a failing one is rolled back."""
        figures = self._figures(time.time())
        for arm in self.traffic.arms:
            if figures[arm.name]["probe"]["map_at_k"] is not None:
                self.probe_gauge.set(figures[arm.name]["probe"]["map_at_k"], tags={"arm": arm.name})
        self.verdicts = verdicts(self.traffic, figures, self.rollbacks, self.config)
        for arm in self.traffic.arms:
            verdict = self.verdicts[arm.name]
            if verdict["verdict"] == "failing" and self.config.auto_rollback:
                await self._roll_back(arm, verdict["reasons"], figures[arm.name])

    async def _roll_back(self, arm, reasons: list[str], figures: dict) -> None:
        """Weight to the primary (Serve config), alias back (registry and audit log), a metric, a log line."""
        from serving.lifecycle.control import update_traffic

        log.warning("rolling back arm %s: %s", arm.name, "; ".join(reasons))
        record = {"time": _now(), "reasons": reasons, "figures": figures, "weights": None, "alias": None,
                  "done": False}
        self.rollbacks[arm.name] = record
        self.rollback_counter.inc(1, tags={"arm": arm.name, "reason": reason_tag(reasons)})
        primary = self.traffic.primary

        def change(traffic: dict) -> dict:
            for a in traffic["arms"]:
                if a["name"] == arm.name:
                    moved, a["weight"] = (0.0 if a.get("shadow") else a["weight"]), 0.0
            for a in traffic["arms"]:
                if a["name"] == primary:
                    a["weight"] += moved
            return traffic

        try:
            new = await asyncio.to_thread(update_traffic, self.app_name, change)
            record["weights"] = {a["name"]: a["weight"] for a in new["arms"]}
        except Exception as err:  # noqa: BLE001 - routers keep falling back meanwhile; say why
            record["weights"] = f"not changed: {err}"
            log.error("arm %s: could not change the split: %s", arm.name, err)
        registered = (await self._model(arm)).get("registered")
        if arm.alias and registered:
            try:
                from serving.lifecycle.promotion import rollback

                entry = await asyncio.to_thread(
                    rollback, registered["name"], arm.alias, root=self.config.root, tracking_uri=self.tracking_uri,
                    reason=f"automatic rollback of arm {arm.name}: {'; '.join(reasons)}", automatic=True,
                    figures=_plain(figures))
                record["alias"] = {"alias": arm.alias, "from": entry.get("from_version"), "to": entry.get("to_version"),
                                   "audit_seq": entry.get("seq")}
            except Exception as err:  # noqa: BLE001
                record["alias"] = f"not moved: {err}"
                log.error("arm %s: could not move alias %s back: %s", arm.name, arm.alias, err)
        record["done"] = True

    async def _model(self, arm) -> dict:
        if arm.name not in self.models:
            try:
                model = await asyncio.wait_for(self.router.arm_model.remote(arm.name), timeout=5.0)
            except Exception:  # noqa: BLE001 - not up yet: asked again next time
                return {}
            if not model:
                return {}
            self.models[arm.name] = model
        return self.models[arm.name]

    async def _record(self) -> None:
        """Each registered arm's record and last gate results, to and from its MLflow model version."""
        if time.time() - self._last_record < self.config.record_every_s:
            return
        self._last_record = time.time()
        figures = self._figures(time.time())
        for arm in self.traffic.arms:
            registered = (await self._model(arm)).get("registered")
            if not registered or arm.name == self.traffic.primary:
                continue
            verdict = self.verdicts.get(arm.name, {}).get("verdict", NO_DATA)
            status = {"healthy": "healthy", "failing": "failing", "rolled back": "rolled_back"}.get(verdict, "no_data")
            f = figures.get(arm.name, {})
            record = {"status": status, "requests": f.get("requests", 0), "error_rate": f.get("error_rate"),
                      "p99_ms": f.get("p99_ms"), "probe_map": f.get("probe", {}).get("map_at_k"), "updated": _now()}
            try:
                from serving.lifecycle.gates import write_canary_record

                await asyncio.to_thread(write_canary_record, (registered["name"], registered["version"]), record,
                                        self.tracking_uri)
                self.gates[arm.name] = await asyncio.to_thread(read_gates, registered["name"], registered["version"],
                                                               self.tracking_uri)
            except Exception as err:  # noqa: BLE001 - MLflow down: the figures stay here
                log.warning("arm %s: canary record not written: %s", arm.name, err)


def read_gates(name: str, version: str, tracking_uri: str | None = None) -> dict:
    """The last promotion gate results recorded on a model version (its ``gate.*`` tags)."""
    from serving.model.registry import client

    tags = client(tracking_uri).get_model_version(name, str(version)).tags
    return {key[len("gate."):]: value for key, value in sorted(tags.items()) if key.startswith("gate.")}


def _plain(value):
    import json

    return json.loads(json.dumps(value, default=str))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
