"""Traffic arms over real Serve, HTTP and MLflow: sticky split, live changes, shadow copies, automatic rollback.

One declarative deployment ("ab", on /ab) of a real-image index coded by a model that ranks by class
(conftest ``ranking_model_dir``), with a champion and a challenger arm, serves every test here; the split and the faults change through the running app's Serve config, as
``terrahash traffic set`` changes them. The challenger's misbehaviour is injected into its arm (serving
.traffic fault injection), so every failure mode is exact and repeatable.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import threading
import time
import urllib.request

import pytest

from serving.runtime.traffic import assign, check_traffic
from tests.conftest import SHARDS
from tests.serving.model.test_registry import MODEL_FILES, register

pytest.importorskip("ray.serve")

APP = "ab"
NAME = "traffic-test-students"
CLIENTS, PER_CLIENT = 20, 20


def text(url: str, query: str = "an airport with planes", client: str | None = None, arm: str | None = None,
         k: int = 10) -> tuple[int, dict, dict]:
    headers = {"content-type": "application/json", **({"X-Client-Id": client} if client else {}),
               **({"X-TerraHash-Arm": arm} if arm else {})}
    request = urllib.request.Request(f"{url}/v1/search/text", data=json.dumps({"query": query, "k": k}).encode(),
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read()), dict(answer.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), dict(err.headers)


def set_traffic(weights: dict | None = None, faults: dict | None = None, shadow: dict | None = None) -> dict:
    """Change the running app's split in place (what `terrahash traffic set` does), faults included."""
    from serving.lifecycle.control import update_traffic
    from serving.runtime.traffic import with_weights

    def change(traffic: dict) -> dict:
        traffic = with_weights(traffic, weights, shadow)
        for arm in traffic["arms"]:
            if faults is not None and arm["name"] in faults:
                arm["fault"] = faults[arm["name"]]
        return traffic
    return update_traffic(APP, change)


def replicas(prefix: str = APP) -> set[str]:
    """Ids of the running replicas of the app's applications, as Serve's controller lists them."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return {f"{name}/{deployment}/{replica['replica_id']}"
            for name, app in details["applications"].items() if name.startswith(prefix)
            for deployment, info in app["deployments"].items() for replica in info["replicas"]
            if replica["state"] == "RUNNING"}


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}" + (f"; last seen: {value!r}"[:2000]
                                                                               if value not in (None, False) else "")
        time.sleep(0.25)


class Load:
    """A bounded concurrent load loop: ``threads`` clients sending text queries until stopped."""

    def __init__(self, url: str, threads: int = 4, client_ids: bool = True, arm: str | None = None):
        self.url, self.arm, self.stop_flag = url, arm, threading.Event()
        self.answers: list[tuple[int, str | None, float]] = []  # (status, arm, seconds)
        self.models: list[str | None] = []  # the model version of each answer, in order
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(f"load-{i}" if client_ids else None,), daemon=True)
                        for i in range(threads)]

    def _loop(self, client: str | None) -> None:
        n = 0
        while not self.stop_flag.is_set():
            start = time.perf_counter()
            status, body, _ = text(self.url, client=f"{client}-{n % 7}" if client else None, arm=self.arm)
            with self.lock:
                self.answers.append((status, body.get("arm"), time.perf_counter() - start))
                self.models.append(body.get("model"))
            n += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def failed(self) -> list:
        return [a for a in self.answers if a[0] != 200]

    def more(self, n: int, timeout: float = 120.0) -> None:
        """Until ``n`` more answers are in (polled, with a deadline): the load has run on what came before."""
        wanted = len(self.answers) + n
        wait_until(lambda: len(self.answers) >= wanted, timeout, f"{n} more answers under load")


@pytest.fixture(scope="module")
def lifecycle(mlflow_server, ranking_model_dir, tmp_path_factory) -> dict:
    """Two registered versions of a model that ranks by class (the same files), and an audit root."""
    folder = tmp_path_factory.mktemp("traffic_version") / "onnx"
    shutil.copytree(ranking_model_dir, folder, ignore=MODEL_FILES)
    versions = [register(mlflow_server, folder, NAME) for _ in range(2)]
    return {"tracking_uri": mlflow_server, "versions": versions, "root": str(tmp_path_factory.mktemp("audit"))}


@pytest.fixture(scope="module")
def ranking_index(local_ray, ranking_model_dir, ucm_many, tmp_path_factory) -> dict:
    """3-shard indexes of the real images, coded by the model that ranks by class: garbage codes must
    score clearly worse than the champion's for the probe mAP drill to mean anything."""
    from serving.ingest.build import build_indexes

    root = tmp_path_factory.mktemp("ranking_index")
    return {"root": root, **build_indexes(ranking_model_dir, ucm_many, SHARDS, str(root), batch_size=32)}


@pytest.fixture(scope="module")
def ab(serve_app, ranking_index, ucm_many, lifecycle, tmp_path_factory):
    """The "ab" app: champion (the index's own model) and challenger (the registry's @challenger)."""
    from serving.app import check_arms, delete_apps
    from serving.lifecycle.control import apply_config
    from serving.lifecycle.promotion import promote
    from serving.runtime.serve_config import serve_config
    from serving.runtime.settings import ServeSettings

    promote(NAME, lifecycle["versions"][0], "challenger", root=lifecycle["root"], force=True,
            reason="first challenger of the traffic tests", tracking_uri=lifecycle["tracking_uri"])
    settings = ServeSettings.from_dict({
        "index": str(ranking_index["root"]), "app_name": APP, "route_prefix": f"/{APP}",
        "tracking_uri": lifecycle["tracking_uri"], "model_cache_dir": str(tmp_path_factory.mktemp("models")),
        "arms": [{"name": "champion", "weight": 100.0},
                 {"name": "challenger", "model": f"models:/{NAME}@challenger", "weight": 0.0}],
        "shard_replicas": 1, "spread_shards": False, "shards_per_replica": 3, "shard_num_cpus": 0.05,
        "encoder_num_cpus": 0.05, "router_num_cpus": 0.05, "max_k": 50,
        "shard_cache_dir": str(tmp_path_factory.mktemp("ab_shards")),
        # no automatic rollback until the rollback drills turn it on
        "canary": {"auto_rollback": False, "interval_s": 0.5, "window_s": 8.0, "min_requests": 10, "min_probes": 8,
                   "max_error_rate": 0.2, "max_p99_ms": 500.0, "max_probe_map_drop": 0.1, "probe_data": str(ucm_many), "probe_rate": 4.0,
                   "probe_count": 40, "probe_k": 10, "root": lifecycle["root"], "record_every_s": 2.0,
                   "alias_poll_s": 1.0}})
    check_arms(settings)
    port = int(serve_app.rsplit(":", 1)[1])
    apply_config(serve_config(settings, port=port))
    url = f"{serve_app}/{APP}"
    wait_until(lambda: _answers(f"{url}/v1/readyz"), 400, "the ab app is ready")  # 4 build tasks at once
    wait_until(lambda: text(url, arm="challenger")[0] == 200, 60, "the challenger arm answers")
    yield {"url": url, "settings": settings, **lifecycle}
    delete_apps(APP)


def test_an_arm_follows_its_alias_live_promoted_then_rolled_back_under_load(ab, capsys):
    """The challenger arm is models:/NAME@challenger. Under load on that arm, a promotion to its alias rolls
    the other version out and `terrahash rollback` rolls the first one back in: 0 failed requests, the
    answers' model switching each way and never back, traffic status naming the version and since when,
    the audit log recording both roll-outs after the moves they follow."""
    from mlflow import MlflowClient

    from cluster.cli.main import main
    from serving.governance.audit import AuditLog
    from serving.lifecycle.promotion import promote

    url, uri, root = ab["url"], ab["tracking_uri"], ab["root"]
    first = MlflowClient(uri).get_model_version_by_alias(NAME, "challenger").version
    other = next(str(v) for v in ab["versions"] if str(v) != first)
    model = {v: f"models:/{NAME}/{v}" for v in (first, other)}
    wait_until(lambda: _traffic(url)["arms"]["challenger"]["serving"]["model"] == model[first], 30,
               "the arm pinned to the version its alias names")
    entries = len(AuditLog(root, NAME).entries())
    with Load(url, threads=3, arm="challenger") as load:
        load.more(20)
        promote(NAME, other, "challenger", root=root, force=True, reason="alias drill", tracking_uri=uri)
        wait_until(lambda: load.models[-1] == model[other], 120, f"answers from {model[other]}")
        load.more(20)
        status = wait_until(lambda: (lambda s: (s.get("rollout") or {}).get("state") == "done" and s)(
            _traffic(url)["arms"]["challenger"]), 30, "the roll-out settled")
        assert status["serving"]["model"] == model[other] and status["serving"]["replicas"] == {model[other]: 1}
        capsys.readouterr()
        assert main(["traffic", "status", "--app", APP]) == 0
        table = capsys.readouterr().out
        assert re.search(rf"serves {re.escape(model[other])} since \S+, following alias challenger", table), table
        assert main(["rollback", NAME, "--alias", "challenger", "--reason", "alias drill over", "--root", root,
                     "--tracking-uri", uri]) == 0
        wait_until(lambda: load.models[-1] == model[first], 120, f"answers from {model[first]} again")
        load.more(20)
        wait_until(lambda: (lambda r: r.get("to") == model[first] and r.get("state") == "done")(
            _traffic(url)["arms"]["challenger"].get("rollout") or {}), 30, "the roll-back's roll-out settled")
    assert load.failed() == [], load.failed()[:5]
    switches = [m for n, m in enumerate(load.models) if n == 0 or m != load.models[n - 1]]
    assert switches == [model[first], model[other], model[first]], switches  # one switch each way, no flapping
    log = AuditLog(root, NAME)
    assert log.verify() == []
    new = [(e["action"], e["from_version"], e["to_version"]) for e in log.entries()[entries:]]
    assert new == [("force-promote", first, other), ("rollout", first, other), ("rollback", other, first),
                   ("rollout", other, first)], new
    assert log.latest("challenger")["action"] == "rollback"  # a roll-out is not a move of the alias


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_assignment_is_sticky_and_raising_a_weight_only_moves_clients_to_the_challenger():
    """The rule itself, on 10,000 client ids: shares match the weights, and 30% -> 60% moves no one back."""
    arms = [{"name": "champion", "weight": 70.0, "model_app": "m", "index_app": "i"},
            {"name": "challenger", "weight": 30.0, "model_app": "m2", "index_app": "i"}]
    low = check_traffic({"arms": arms})
    high = check_traffic({"arms": [{**arms[0], "weight": 40.0}, {**arms[1], "weight": 60.0}]})
    before = {c: assign(low, f"client-{c}") for c in range(10_000)}
    after = {c: assign(high, f"client-{c}") for c in range(10_000)}
    assert abs(sum(a == "challenger" for a in before.values()) / 10_000 - 0.30) < 0.015
    assert abs(sum(a == "challenger" for a in after.values()) / 10_000 - 0.60) < 0.015
    assert not [c for c in before if before[c] == "challenger" and after[c] != "challenger"]
    salted = check_traffic({"arms": arms, "salt": "another experiment"})
    assert sum(assign(salted, f"client-{c}") != before[c] for c in range(10_000)) > 2_000  # a new salt reshuffles
    with pytest.raises(ValueError, match="sum to 100"):
        check_traffic({"arms": [{**arms[0], "weight": 50.0}, arms[1]]})


def test_split_by_client_id_over_http(ab, capsys):
    """20 client ids x 20 requests at 30%: one arm per client, the share of clients as the rule says (and
    within binomial tolerance of 30%); at 60% no client returns to the champion."""
    from serving.lifecycle.control import current_traffic

    from cluster.cli.main import main

    url = ab["url"]
    assert main(["traffic", "set", "--app", APP, "--weights", "champion=70,challenger=30"]) == 0  # the CLI itself

    fallbacks = []

    def arms_seen(client: str) -> set[str]:
        """The arms a client was assigned (an answer the primary gave for a slow challenger says so)."""
        seen = set()
        for _ in range(PER_CLIENT):
            status, body, headers = text(url, client=client)
            assert status == 200 and body["arm"] == headers["x-terrahash-arm"], body
            seen.add(body.get("fallback_from") or body["arm"])
            if body.get("fallback_from"):
                fallbacks.append(body["fallback_from"])
        return seen

    clients = [f"user-{i}" for i in range(CLIENTS)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        seen = dict(zip(clients, pool.map(arms_seen, clients)))
    assert all(len(arms) == 1 for arms in seen.values()), seen
    traffic = check_traffic(current_traffic(APP))
    on_challenger = {c for c, arms in seen.items() if arms == {"challenger"}}
    assert on_challenger == {c for c in clients if assign(traffic, c) == "challenger"}
    assert 1 <= len(on_challenger) <= 12  # 30% of 20: mean 6, 3 sigma = 6.1
    set_traffic({"champion": 40, "challenger": 60})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        later = dict(zip(clients, pool.map(arms_seen, clients)))
    assert all(later[c] == {"challenger"} for c in on_challenger), (on_challenger, later)  # nobody moved back
    assert len([c for c in clients if later[c] == {"challenger"}]) >= len(on_challenger)
    assert len(fallbacks) < 0.05 * 2 * CLIENTS * PER_CLIENT  # a healthy challenger is rarely too slow
    capsys.readouterr()
    assert main(["traffic", "status", "--app", APP]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^champion\s+40\s", table, re.M) and re.search(r"^challenger\s+60\s", table, re.M), table
    status, body, _ = text(url, client="user-0", arm="champion")  # forced
    assert status == 200 and body["arm"] == "champion" and body["model_version"]
    assert text(url, arm="nobody")[0] == 422


def test_live_weight_changes_and_arms_added_and_removed_lose_no_request(ab, ranking_model_dir):
    """Weights 0 -> 50 -> 100 -> 0 and a third arm added then removed, under load: 0 failed requests,
    no replica restarted."""
    from cluster.cli.traffic import _without
    from serving.lifecycle.control import apply_new_config, current_config, update_traffic
    from serving.runtime.serve_config import serve_config

    url, settings = ab["url"], ab["settings"]
    set_traffic({"champion": 100, "challenger": 0})
    before = replicas()
    with Load(url, threads=4) as load:
        for weight in (0, 50, 100, 0):
            set_traffic({"champion": 100 - weight, "challenger": weight})
            load.more(40)
        third = settings.model_copy(update={"arms": [*settings.arms, settings.arms[0].model_copy(
            update={"name": "third", "model": str(ranking_model_dir), "weight": 0.0})]})
        config = serve_config(third, port=current_config()["http_options"]["port"])
        apply_new_config(config, APP)
        wait_until(lambda: text(url, arm="third")[0] == 200, 90, "the third arm answers")
        set_traffic({"champion": 60, "challenger": 0, "third": 40})
        load.more(60)
        update_traffic(APP, lambda t: _without(t, ["third"]))  # as `terrahash traffic apply` removes an arm
        load.more(30)
        apply_new_config(serve_config(settings, port=current_config()["http_options"]["port"]), APP)
        load.more(max(60, 1000 - len(load.answers)), timeout=300)
    assert load.failed() == [], load.failed()[:5]
    served = {arm for _, arm, _ in load.answers}
    assert {"champion", "challenger", "third"} <= served
    assert before <= replicas(), "a replica of the original arms was restarted"
    wait_until(lambda: _third_key(third) not in serve_status_apps(), 60, "the removed arm's model application gone")


def serve_status_apps() -> list[str]:
    from ray import serve

    return list(serve.status().applications)


def _third_key(settings) -> str:
    from serving.runtime.serve_config import model_app_name

    return model_app_name(settings, settings.arms[-1])


def test_shadow_copies_never_change_or_slow_a_client_answer(ab, ray_metrics_url):
    url = ab["url"]
    set_traffic({"champion": 100}, shadow={"challenger": 100}, faults={"challenger": None})
    baseline = [text(url, query=f"a harbour with boats {i}")[1]["results"] for i in range(20)]
    wait_until(lambda: _shadow_figures(url).get("overlap_at_k") is not None, 30, "shadow overlap figures")
    assert _shadow_figures(url)["overlap_at_k"] == pytest.approx(1.0)  # the same model: the same top-k
    for fault in ({"error_rate": 1.0}, {"delay_s": 3.0}):
        set_traffic(faults={"challenger": fault})
        answers = [text(url, query=f"a harbour with boats {i}") for i in range(20)]
        assert all(status == 200 and body["arm"] == "champion" for status, body, _ in answers)
        assert [body["results"] for _, body, _ in answers] == baseline
        # The router's own measure of each request: none of them waited out the shadow's 3 s delay.
        assert max(body["latency_ms"] for _, body, _ in answers) < 3000, (fault, [b["latency_ms"] for _, b, _ in answers])
    metrics = wait_until(lambda: (lambda t: "terrahash_shadow_overlap" in t and t)(
        urllib.request.urlopen(ray_metrics_url, timeout=10).read().decode()), 30, "shadow metrics exported")
    assert 'arm="challenger"' in metrics and "ray_terrahash_arm_requests_total" in metrics
    set_traffic({"champion": 100, "challenger": 0}, faults={"challenger": None})


def test_the_drift_gauge_fires_on_a_shifted_feed_and_answers_fall_back(ab, ranking_index, ranking_model_dir,
                                                                       ucm_many, ray_metrics_url):
    """D of the champion's last 32 image queries equals the index's detector on their codes (canary probes
    are not counted); a feed of blank frames sets the alarm, the answers are flagged and re-ranked by the
    float query code, the gauge says so, and 32 real scenes later the feed is clean again."""
    import io
    from pathlib import Path

    from PIL import Image

    from serving.model.versions import find_spec
    from serving.ingest.items import dataset_items
    from serving.index.drift import BitDrift
    from serving.model.encoders import load_encoder
    from tests.serving.test_app import call, multipart

    recorded = ranking_index["images"]["extra"]["drift"]
    assert recorded["window"] == 32 and recorded["reference_codes"] == 168  # 80% of the 210 indexed images
    detector = BitDrift.from_json(recorded)
    encoder = load_encoder(find_spec(ranking_model_dir, "image"))
    scenes = [Path(p).read_bytes() for p in dataset_items(ucm_many).image_paths[::6][:32]]  # one per 6: all classes

    def search(data: bytes) -> dict:
        body, kind = multipart({"k": "5"}, data)
        status, answer = call(f"{ab['url']}/v1/search/image", body, kind, headers={"X-TerraHash-Arm": "champion"})
        assert status == 200, answer
        return answer

    clean = [search(data) for data in scenes][-1]
    assert clean["drift"]["statistic"] == pytest.approx(detector.statistic(encoder.encode(scenes)), rel=1e-6)
    assert clean["drift"]["threshold"] == pytest.approx(recorded["threshold"])
    assert not clean["drift"]["alarm"] and clean["drift"]["fallback"] is None and clean["rerank"] == "none"

    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(buffer, format="JPEG")
    blank = [search(buffer.getvalue()) for _ in range(32)][-1]
    assert blank["drift"]["alarm"] and blank["drift"]["statistic"] > 3 * detector.threshold
    assert blank["drift"]["fallback"] == "asymmetric" and blank["rerank"] == "asymmetric"
    wait_until(lambda: any(line.startswith("ray_terrahash_query_drift_alarm") and 'arm="champion"' in line
                           and line.rstrip().endswith(" 1.0")
                           for line in urllib.request.urlopen(ray_metrics_url, timeout=10).read().decode().splitlines()),
               30, "the drift alarm gauge at 1")
    assert not [search(data) for data in scenes][-1]["drift"]["alarm"]


def _shadow_figures(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/traffic", timeout=10) as answer:
        return json.loads(answer.read())["arms"]["challenger"].get("mirror") or {}


@pytest.mark.parametrize("fault,reason", [({"error_rate": 1.0}, "error rate"), ({"delay_s": 0.7}, "p99"),
                                          ({"garbage": True}, "probe mAP")])
def test_a_failing_challenger_is_rolled_back_with_no_failed_request(ab, fault, reason):
    """An encoder that raises, one that is slow, one whose codes are garbage: each rolled back within the
    window, no client request failing, the alias moved back in MLflow, a verified audit entry."""
    from mlflow import MlflowClient

    from serving.governance.audit import AuditLog
    from serving.lifecycle.control import update_canary
    from serving.lifecycle.promotion import promote

    url = ab["url"]
    update_canary(APP, {"auto_rollback": True})
    first, second = ab["versions"]
    promote(NAME, second, "challenger", root=ab["root"], force=True, reason=f"challenger for the {reason} drill",
            tracking_uri=ab["tracking_uri"])
    set_traffic({"champion": 70, "challenger": 30}, faults={"challenger": fault})
    try:
        with Load(url, threads=3) as load:
            status = wait_until(lambda: (lambda s: (s["arms"]["challenger"]["rollback"] or {}).get("done") and s
                                         or _Seen(s["arms"]))(_traffic(url)),
                                ab["settings"].canary.window_s + 25, f"the challenger rolled back on {reason}")
            load.more(20)  # and clients go on being answered after it
        assert load.failed() == [], load.failed()[:5]
        challenger = status["arms"]["challenger"]
        assert any(reason in r for r in challenger["rollback"]["reasons"]), challenger
        assert status["arms"]["champion"]["probe"]["map_at_k"] > 0.2, status["arms"]["champion"]  # above chance
        assert _traffic(url)["arms"]["challenger"]["weight"] == 0
        alias = MlflowClient(ab["tracking_uri"]).get_model_version_by_alias(NAME, "challenger")
        assert alias.version == str(first), challenger["rollback"]  # moved back to the version it held before
        log = AuditLog(ab["root"], NAME)
        assert log.verify() == []
        last = log.moves("challenger")[-1]  # the arm's roll-out back to `first` may already follow it in the log
        assert last["action"] == "auto-rollback" and last["from_version"] == str(second) and reason in last["reason"]
    finally:  # the next drill starts from a healthy split whatever this one found, the arm settled on its alias
        set_traffic({"champion": 100, "challenger": 0}, faults={"challenger": None})
        wait_until(lambda: _settled(ab, "challenger"), 60, "the challenger serving the version its alias names")


def _settled(ab: dict, arm: str) -> bool:
    """The arm serves the version its alias names, on every router, with no roll-out under way."""
    from mlflow import MlflowClient

    version = MlflowClient(ab["tracking_uri"]).get_model_version_by_alias(NAME, arm).version
    status = _traffic(ab["url"])["arms"][arm]
    return (status.get("rollout") or {}).get("state") in (None, "done", "failed") \
        and status["serving"]["replicas"] == {f"models:/{NAME}/{version}": 1}


class _Seen(str):
    """A falsy value that a timed-out wait prints: what the canary saw last."""

    def __new__(cls, arms: dict):
        return super().__new__(cls, json.dumps({name: {key: arm.get(key) for key in ("verdict", "requests", "probe",
                                                                                      "rollback")}
                                                for name, arm in arms.items()}))

    def __bool__(self):
        return False


def _traffic(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/traffic", timeout=10) as answer:
        return json.loads(answer.read())
