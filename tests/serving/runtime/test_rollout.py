"""A router replica's side of a roll-out (serving.runtime.arms.Backends): an arm answers with the backend it has
until the version rolled out on it is ready, then switches and drops the old one; a version it cannot load
stays staged, saying why, and the arm goes on answering."""
from __future__ import annotations

import asyncio

import pytest

from serving.runtime.arms import Backend, Backends, Unusable
from serving.runtime.traffic import check_traffic

ALIAS = "models:/students@champion"


def routes(serving: str | None = None, weight: float = 100.0):
    return check_traffic({"arms": [{"name": "champion", "weight": weight, "model_app": "m", "index_app": "i",
                                    "model": ALIAS, "alias": "champion", "serving": serving}]}).arms


@pytest.fixture
def loads(monkeypatch):
    """Backend.resolve replaced: a backend becomes ready when its model's gate opens (or fails as told);
    ``loads["count"]`` counts the models loaded."""
    state = {"gates": {}, "fail": {}, "count": 0}

    async def resolve(self, options, pool):
        state["count"] += 1
        if self.model_uri in state["fail"]:
            raise state["fail"][self.model_uri]
        await state["gates"].setdefault(self.model_uri, asyncio.Event()).wait()
        version = {ALIAS: "3"}.get(self.model_uri, self.model_uri.rsplit("/", 1)[-1])
        self.model = {"registered": {"name": "students", "version": version}, "model_version": f"students-{version}"}
        self.ready, self.problem = True, None
        self.resolved.set()

    monkeypatch.setattr(Backend, "resolve", resolve)
    return state


def served(arm) -> str:
    return arm.versions()["model"]


def test_an_arm_answers_with_the_old_version_until_the_new_one_is_ready(loads):
    async def scenario():
        backends = Backends({}, pool=None)
        loads["gates"][ALIAS] = asyncio.Event()
        loads["gates"][ALIAS].set()
        arm = backends.arms(routes())["champion"]
        await arm.backend.wait_ready(2.0)
        assert served(arm) == "models:/students/3" and arm.staged is None

        # pinned to the version it already serves: the same backend, nothing loaded again
        arm = backends.arms(routes("models:/students/3"))["champion"]
        await asyncio.sleep(0.05)
        assert served(arm) == "models:/students/3" and arm.staged is None and loads["count"] == 1

        # version 4 rolled out: the arm keeps answering with 3 while 4 loads
        arm = backends.arms(routes("models:/students/4"))["champion"]
        await asyncio.sleep(0.3)
        assert served(arm) == "models:/students/3" and arm.staged.model_uri == "models:/students/4"
        assert arm.serving() == {"model": "models:/students/3", "staged": "models:/students/4",
                                 "problem": "not resolved yet", "unusable": False}
        old = arm.backend
        arm = backends.arms(routes("models:/students/4", weight=100.0))["champion"]  # another change meanwhile
        assert arm.backend is old and arm.staged is not None
        loads["gates"]["models:/students/4"].set()
        for _ in range(100):
            if arm.staged is None:
                break
            await asyncio.sleep(0.05)
        assert served(arm) == "models:/students/4" and arm.serving() == {"model": "models:/students/4"}
        assert old not in backends._backends()  # the old version's model and shards are let go
        return backends

    asyncio.run(scenario())


def test_a_version_that_cannot_be_loaded_stays_staged_and_the_arm_keeps_answering(loads):
    async def scenario():
        loads["gates"]["models:/students/3"] = asyncio.Event()
        loads["gates"]["models:/students/3"].set()
        loads["fail"]["models:/students/9"] = Unusable("model students/9 does not speak the code space of the index")
        backends = Backends({}, pool=None)
        arm = backends.arms(routes("models:/students/3"))["champion"]
        await arm.backend.wait_ready(2.0)
        arm = backends.arms(routes("models:/students/9"))["champion"]
        for _ in range(100):
            if arm.serving().get("unusable"):
                break
            await asyncio.sleep(0.05)
        report = arm.serving()
        assert report["model"] == "models:/students/3" and report["staged"] == "models:/students/9"
        assert report["unusable"] and "code space" in report["problem"]
        assert arm.ready  # still answering, with version 3
        # the route put back (the controller does so): the staged backend is dropped
        arm = backends.arms(routes("models:/students/3"))["champion"]
        assert arm.staged is None and served(arm) == "models:/students/3"
        assert [b.model_uri for b in backends._backends()] == ["models:/students/3"]

    asyncio.run(scenario())


@pytest.fixture
def deployed(monkeypatch):
    """A Serve config held here instead of Serve's (serving.lifecycle.control reads and applies it)."""
    import copy

    from serving.lifecycle import control

    state = {}
    monkeypatch.setattr(control, "current_config", lambda: copy.deepcopy(state["config"]))
    monkeypatch.setattr(control, "apply_config", lambda config: state.update(config=copy.deepcopy(config)))
    return state


def settings_of(layout: str):
    from serving.runtime.settings import ServeSettings

    return ServeSettings.from_dict({"index": "/archive/index", "layout": layout,
                                    "arms": [{"name": "champion", "model": ALIAS, "weight": 100.0}]})


def apps_and_arm(config: dict) -> tuple[dict, dict]:
    from serving.lifecycle.control import current_traffic_of

    return ({a["name"]: a["args"].get("model") for a in config["applications"] if a["name"] != "terrahash"},
            current_traffic_of(config, "terrahash")["arms"][0])


def test_a_split_roll_out_starts_the_versions_own_application_and_stops_the_old_one(deployed):
    from serving.lifecycle.control import apply_new_config, restore_arm, roll_out, settle_roll_out
    from serving.runtime.serve_config import pinned_model_app_name, serve_config

    deployed["config"] = serve_config(settings_of("split"))
    apps, arm = apps_and_arm(deployed["config"])
    alias_app = arm["model_app"]
    v4 = "models:/students/4"
    v4_app = pinned_model_app_name("terrahash", v4, "fp32")

    roll_out("terrahash", "champion", v4, "2026-01-01T00:00:00+00:00", wait=False)
    apps, arm = apps_and_arm(deployed["config"])
    assert apps[alias_app] == ALIAS and apps[v4_app] == v4  # beside the old one
    assert (arm["model_app"], arm["serving"], arm["since"]) == (v4_app, v4, "2026-01-01T00:00:00+00:00")
    canary = deployed["config"]["applications"][-1]["deployments"][1]["user_config"]["traffic"]
    assert canary["arms"][0]["model_app"] == v4_app and canary["revision"] == 1

    settle_roll_out("terrahash", "champion", "2026-01-01T00:01:00+00:00", wait=False)  # every router switched
    apps, arm = apps_and_arm(deployed["config"])
    assert alias_app not in apps and apps[v4_app] == v4 and arm["since"] == "2026-01-01T00:01:00+00:00"

    # a failed roll-out of version 5 is put back as it was
    before = dict(arm)
    roll_out("terrahash", "champion", "models:/students/5", "2026-01-01T00:02:00+00:00", wait=False)
    restore_arm("terrahash", before, wait=False)
    apps, arm = apps_and_arm(deployed["config"])
    assert list(apps.values()).count("models:/students/5") == 0 and apps[v4_app] == v4
    assert (arm["model_app"], arm["serving"]) == (v4_app, v4)

    # the same settings applied again (`terrahash traffic apply`): the arm keeps the version rolled out
    apply_new_config(serve_config(settings_of("split")), wait=False)
    apps, arm = apps_and_arm(deployed["config"])
    assert apps == {next(a for a in apps if "index" in a): None, v4_app: v4}, apps
    assert (arm["model_app"], arm["serving"]) == (v4_app, v4)


def test_a_colocated_roll_out_only_changes_the_route(deployed):
    from serving.lifecycle.control import roll_out
    from serving.runtime.serve_config import serve_config

    deployed["config"] = serve_config(settings_of("colocated"))
    before = [a["name"] for a in deployed["config"]["applications"]]
    roll_out("terrahash", "champion", "models:/students/4", "2026-01-01T00:00:00+00:00", wait=False)
    apps, arm = apps_and_arm(deployed["config"])
    assert [a["name"] for a in deployed["config"]["applications"]] == before
    assert arm["serving"] == "models:/students/4"


def test_the_controller_pins_rolls_out_and_refuses_a_version_the_routers_cannot_serve(monkeypatch, tmp_path):
    """serving.lifecycle.follow.AliasFollower against a registry and routers played here: the first check pins
    the arm to what the routers serve, a move rolls the new version out once every router serves it, a
    version the routers find unusable is put back, recorded, and not tried again."""
    from serving.governance.audit import AuditLog
    from serving.lifecycle import control, follow
    from serving.runtime.settings import CanaryConfig

    registry = {"version": "models:/students/3"}
    routers = {"r1": {"champion": {"model": "models:/students/3"}}, "r2": {"champion": {"model": "models:/students/3"}}}
    calls, switched = [], []
    traffic = {"route": routes()}

    def roll_out(app, arm, version, since, start_app=True, wait=True):
        calls.append(("roll_out", version, start_app))
        traffic["route"] = routes(version)
        if start_app and version != "models:/students/5":  # the routers load it and switch
            for replica in routers.values():
                replica["champion"] = {"model": version}
        elif start_app:
            for replica in routers.values():
                replica["champion"] = {**replica["champion"], "staged": version, "unusable": True,
                                       "problem": "Unusable: another code space"}

    def restore_arm(app, route, wait=True):
        calls.append(("restore", route["serving"]))
        traffic["route"] = routes(route["serving"])
        for replica in routers.values():
            replica["champion"] = {"model": replica["champion"]["model"]}

    monkeypatch.setattr(follow, "alias_version", lambda name, alias, uri: registry["version"])
    monkeypatch.setattr(follow, "running_routers", lambda app: len(routers))
    monkeypatch.setattr(control, "roll_out", roll_out)
    monkeypatch.setattr(control, "restore_arm", restore_arm)
    monkeypatch.setattr(control, "settle_roll_out", lambda app, arm, since, wait=True: calls.append(("settle",)))
    config = CanaryConfig(alias_poll_s=0.01, rollout_timeout_s=5.0, root=str(tmp_path))

    async def check(follower):
        follower._last = 0.0
        follower.tick(check_traffic({"arms": [traffic["route"][0].model_dump()]}), config)
        await follower._task

    async def scenario():
        follower = follow.AliasFollower("terrahash", None, lambda: routers, on_switched=switched.append)
        await check(follower)  # pinned to what both routers serve: nothing loaded
        assert calls == [("roll_out", "models:/students/3", False)]
        registry["version"] = "models:/students/4"
        await check(follower)
        assert calls[1:] == [("roll_out", "models:/students/4", True), ("settle",)] and switched == ["champion"]
        assert follower.rollouts["champion"]["state"] == "done" and follower.served("champion") == {"models:/students/4": 2}
        registry["version"] = "models:/students/5"
        await check(follower)
        assert calls[3:] == [("roll_out", "models:/students/5", True), ("restore", "models:/students/4")]
        assert "another code space" in follower.rollouts["champion"]["problem"]
        await check(follower)
        assert len(calls) == 5  # not tried again while the alias names it
        return follower

    asyncio.run(scenario())
    entries = [(e["action"], e["from_version"], e["to_version"]) for e in AuditLog(str(tmp_path), "students").entries()]
    assert entries == [("rollout", "3", "4"), ("rollout-failed", "4", "5")]
