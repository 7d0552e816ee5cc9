"""The router's view of its traffic arms: each arm's backends (encoder and index), found by name and
described once, and the per-arm figures it reports to the canary controller.

A backend is resolved in the background: the router asks the index application's ``IndexInfo`` to
describe the index and, split, the model application's ``QueryEncoder`` to describe the model, or,
co-located (serving/runtime/local.py), loads the model and the index's local shard groups itself; it
checks that they share a code space and takes handles to the shard groups it does not hold. Until then,
or when they disagree, the arm is not ready and its requests are answered by the primary arm. Arms that
declare the same applications and model share a backend. Local shard groups report their readiness as
shard replicas do, every health period.

An arm whose model changes (the canary controller rolls out the version its alias now names: ``serving``
of its route) keeps answering with the backend it has while the new one is resolved beside it (its
``staged`` backend), and switches once that one is ready; the old one is then dropped. A new backend
that cannot be resolved stays staged, saying why, and the arm goes on answering with the old one.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from serving.runtime.calls import awaited
from serving.runtime.local import LocalEncoder, LocalHandle, LocalShards, described
from serving.runtime.query_encoder import DEFAULT_MODEL_CACHE, load_model
from serving.runtime.traffic import ArmRoute

log = logging.getLogger("ray.serve")

DESCRIBE_TIMEOUT_S = 5.0
MAX_SAMPLES = 2000  # latency samples kept per arm between two reports


class Backend:
    """An arm's encoder and index: deployment handles, or (co-located) objects in this replica behind
    serving.runtime.local.LocalHandle, and their descriptions."""

    def __init__(self, model_app: str, index_app: str, model: str | None = None):
        self.model_app, self.index_app, self.model_uri = model_app, index_app, model
        self.ready = self.unusable = False
        self.problem: str | None = "not resolved yet"
        self.encoder = self.reports = None
        self.text = None  # the text student's LocalHandle, when the router encodes text (split layout)
        self.index: dict = {}  # IndexInfo.describe()
        self.model: dict = {}  # QueryEncoder.describe()
        self.shards: dict[str, list] = {"images": [], "captions": []}
        self.local: list = []  # the shard groups held here (serving.runtime.replicas.ShardServer's state)
        self.resolved = asyncio.Event()  # made in the replica's event loop (by reconfigure)

    @property
    def key(self) -> tuple:
        """(model app, index app, model): what Backends finds it by."""
        return self.model_app, self.index_app, self.model_uri

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the backend to be resolved (a request arriving just after start)."""
        if not self.ready and timeout > 0:
            try:
                await asyncio.wait_for(self.resolved.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.ready

    async def resolve(self, options: dict, pool: Executor) -> None:
        """Describe the two applications and take handles (or load them here, co-located); raises with the
        reason when they are not usable."""
        from ray import serve

        info = serve.get_deployment_handle("IndexInfo", self.index_app)
        index = await asyncio.wait_for(awaited(info.describe.remote()), DESCRIBE_TIMEOUT_S)
        colocated = options.get("layout") == "colocated"
        if colocated:
            loaded = await asyncio.to_thread(_usable, load_model, self.model_uri, index["index"], index.get("release"),
                                             options.get("encoder_variant", "fp32"), options.get("tracking_uri"),
                                             options.get("model_cache_dir", DEFAULT_MODEL_CACHE))
            model = described(loaded)
        else:
            encoder = serve.get_deployment_handle("QueryEncoder", self.model_app)
            model = await asyncio.wait_for(awaited(encoder.describe.remote()), DESCRIBE_TIMEOUT_S)
        if index.get("code_space") and model.get("code_space") and index["code_space"] != model["code_space"]:
            raise Unusable(f"model {model['model']} (code space {model['code_space'][:19]}) does not speak the "
                             f"code space of index {index['index']} release {index['release']} "
                             f"({index['code_space'][:19]})")
        if int(model["bits"]) != int(index["bits"]):
            raise Unusable(f"model {model['model']} gives {model['bits']}-bit codes, the index holds {index['bits']}")
        threads = int(options.get("encoder_threads", 1))
        text = None
        if colocated:
            encoder = LocalHandle(await asyncio.to_thread(LocalEncoder, loaded, threads, pool), pool, "QueryEncoder")
        elif options.get("router_encodes_text"):
            text = LocalHandle(await asyncio.to_thread(_load_text, model, options, threads, pool), pool, "QueryEncoder")
        reports = serve.get_deployment_handle("ShardReports", self.index_app) if index.get("reports") else None
        local = await self._local_groups(index, reports, pool) if colocated else {}
        self.shards = {c: local.get(c, []) + [serve.get_deployment_handle(name, self.index_app)
                                              for name in index["groups"].get(c, [])[len(local.get(c, [])):]]
                       for c in ("images", "captions")}
        self.local = [handle.target.group for handles in local.values() for handle in handles]
        self.reports, self.encoder, self.index, self.model, self.text = reports, encoder, index, model, text
        self.ready, self.problem = True, None
        self.resolved.set()

    async def _local_groups(self, index: dict, reports, pool: Executor) -> dict[str, list]:
        """The index's first ``local_groups`` shard groups of each collection, loaded and verified here
        (in a thread: the event loop keeps serving the other arms meanwhile), reporting to ``reports``."""
        held = {}
        for collection, groups in index.get("group_shards", {}).items():
            held[collection] = []
            for names, label in zip(groups[:index["local_groups"][collection]], index["groups"][collection]):
                args = (index["index"], collection, index["index_version"][collection], names, None,
                        index["local"]["threads"], index["local"]["cache_dir"], index["local"]["period_s"],
                        index["local"]["key_file"])
                group = await asyncio.to_thread(_load_group, args)
                # reported as a replica of that group, one per router replica
                group.reports, group.deployment, group.replica = reports, label, f"{group.replica}/{label}"
                await group._report()
                held[collection].append(LocalHandle(LocalShards(group, pool), pool, label))
        return held


class Unusable(ValueError):
    """A backend that no retry will make usable: a model of another code space than the index, or a model
    version that is not there."""


def _usable(load, *args):
    """``load(*args)``, its missing model or files raised as Unusable."""
    from serving.model.registry import ModelNotFoundError

    try:
        return load(*args)
    except (ModelNotFoundError, FileNotFoundError) as err:
        raise Unusable(str(err)) from err


def _load_group(args: tuple):
    """A serving.runtime.replicas.ShardServer's state built in this thread (its ``__init__`` is a coroutine)."""
    from serving.runtime.replicas import ShardServer

    cls = ShardServer.func_or_class
    group = cls.__new__(cls)
    asyncio.run(group.__init__(*args))
    return group


def _load_text(model: dict, options: dict, threads: int, pool: Executor) -> LocalEncoder:
    from serving.model.versions import find_spec
    from serving.model.registry import fetch_model

    folder = fetch_model(model["model"], cache_dir=options.get("model_cache_dir", DEFAULT_MODEL_CACHE),
                         tracking_uri=options.get("tracking_uri"))
    spec = str(find_spec(folder, "text", model.get("variant", "fp32")))
    return LocalEncoder({"text_spec": spec, "image_spec": None, "folder": str(folder)}, threads, pool,
                        load_image=False)


@dataclass
class Arm:
    """A route (name, weight, fault, ...), the backend that answers for it and, while another model version
    is rolled out on it, the backend that will."""

    route: ArmRoute
    backend: Backend
    staged: Backend | None = None

    @property
    def name(self) -> str:
        return self.route.name

    @property
    def ready(self) -> bool:
        return self.backend.ready

    def versions(self) -> dict:
        """What an answer says of the arm that served it."""
        model, index = self.backend.model, self.backend.index
        registered = model.get("registered")  # the registry's name for it, else its label: never a server folder
        name = f"models:/{registered['name']}/{registered['version']}" if registered else model.get("model_version")
        return {"arm": self.name, "model_version": model.get("model_version"), "model": name,
                "index_version": index.get("index_version"), "release": index.get("release")}

    def serving(self) -> dict:
        """What this replica serves on the arm (its report to the canary controller): the model
        (``models:/NAME/VERSION`` of a registered one) and the one being rolled out, with its problem."""
        out = {"model": self.versions()["model"] if self.ready else None}
        if self.staged is not None:
            out.update(staged=self.staged.model_uri, problem=self.staged.problem, unusable=self.staged.unusable)
        return out


class Backends:
    """Resolved backends by (model app, index app, model), kept across reconfigures; a loop resolves new
    ones and switches an arm to its staged backend once that is ready."""

    def __init__(self, options: dict, pool: Executor):
        self.options, self.pool = options, pool
        self.by_key: dict[tuple, Backend] = {}  # (model app, index app, model) -> backend
        self.current: dict[str, Arm] = {}
        self._task: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None

    def arms(self, routes: list[ArmRoute]) -> dict[str, Arm]:
        """The arms of a new split. An arm whose model changed keeps its ready backend until the new one is
        ready (``staged``); a route pinned to the version its backend already serves keeps that backend."""
        arms = {}
        for route in routes:
            key = (route.model_app, route.index_app, route.serving or route.model)
            before = self.current.get(route.name)
            backend = self.by_key.get(key)
            if backend is None and before is not None and before.ready and route.serving \
                    and before.backend.key[:2] == key[:2] and before.versions()["model"] == route.serving:
                backend = self.by_key[key] = before.backend  # pinned to what it serves already: nothing to load
            if backend is None:
                backend = self.by_key[key] = Backend(*key)
            if before is not None and before.backend is not backend and before.ready and not backend.ready:
                arms[route.name] = Arm(route, before.backend, staged=backend)  # answers on the old meanwhile
            else:
                arms[route.name] = Arm(route, backend)
        self.current = arms
        self._drop_unused()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._resolve_loop())
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
        return arms

    def _drop_unused(self) -> None:
        """Forget the backends no arm uses or stages (a removed arm's, or one rolled out from): their
        handles, models and local shard groups go with them."""
        used = {id(b) for arm in self.current.values() for b in (arm.backend, arm.staged) if b is not None}
        for key in [k for k, b in self.by_key.items() if id(b) not in used]:
            del self.by_key[key]

    def _switch_staged(self) -> None:
        """Arms whose staged backend is ready now answer with it."""
        switched = False
        for arm in self.current.values():
            if arm.staged is not None and arm.staged.ready:
                log.info("arm %s: now serving %s (was %s)", arm.name, arm.staged.model_uri, arm.backend.model_uri)
                arm.backend, arm.staged, switched = arm.staged, None, True
        if switched:
            self._drop_unused()

    def local_groups(self) -> list:
        """Every shard group held in this replica (serving.runtime.replicas.ShardServer's state)."""
        return [group for backend in self._backends() for group in backend.local]

    def _backends(self) -> list[Backend]:
        """Each backend once (one re-pinned to the version it serves is known under two keys)."""
        return list({id(b): b for b in self.by_key.values()}.values())

    async def _report_loop(self) -> None:
        """The local shard groups' readiness to their index's ShardReports, every health period."""
        while True:
            groups = self.local_groups()
            await asyncio.sleep(min((g.period_s for g in groups), default=2.0))
            for group in groups:
                await group._report()

    async def _resolve_loop(self) -> None:
        delay = 0.2
        while any(not b.ready for b in self.by_key.values()):
            for backend in [b for b in self._backends() if not b.ready]:
                try:
                    await backend.resolve(self.options, self.pool)
                    log.info("arm backend %s + %s ready", backend.model_uri or backend.model_app, backend.index_app)
                    self._switch_staged()
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # not deployed yet, or unusable: say why, try again
                    problem = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                    if problem != backend.problem:
                        log.warning("arm backend %s + %s not usable: %s", backend.model_app, backend.index_app, problem)
                    backend.problem, backend.unusable = problem, isinstance(err, Unusable)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)


class ArmStats:
    """Per-arm outcomes since the last report, live and shadow apart: samples (ok, seconds, fallback) for
    live arms, (ok, seconds, overlap@k, rank correlation) for shadow ones; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: dict[str, list] = {}
        self._shadow: dict[str, list] = {}
        self.dropped = 0  # samples beyond MAX_SAMPLES per arm and report: not reported

    def record(self, arm: str, ok: bool, seconds: float, shadow: bool = False, fallback: bool = False,
               overlap: float | None = None, rank: float | None = None) -> None:
        sample = (ok, round(seconds, 6), overlap, rank) if shadow else (ok, round(seconds, 6), fallback)
        with self._lock:
            samples = (self._shadow if shadow else self._live).setdefault(arm, [])
            if len(samples) < MAX_SAMPLES:
                samples.append(sample)
            else:
                self.dropped += 1

    def drain(self) -> dict:
        """{"live": {arm: samples}, "shadow": {arm: samples}}, and start afresh."""
        with self._lock:
            live, shadow = self._live, self._shadow
            self._live, self._shadow = {}, {}
        return {"live": live, "shadow": shadow}


def garbage_code(bits: int, seed_text: str) -> np.ndarray:
    """A random code (the ``garbage`` fault): stable per query, unrelated to it."""
    import hashlib

    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
    return np.random.default_rng(seed).standard_normal(bits).astype(np.float32)
