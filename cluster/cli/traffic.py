"""``terrahash traffic status|set|apply``: see and change the split of a running search app.

The commands join the Ray cluster the app runs on (local by default, ``--address`` or $RAY_ADDRESS for
another) and change the router's and the canary's ``user_config`` through the Serve config the app was
deployed from (serving/lifecycle/control.py): replicas are reconfigured in place, none restarts.
"""
from __future__ import annotations

import argparse
import json


def _connect(address: str | None) -> None:
    import logging
    import os

    import ray

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no handle and long-poll INFO lines here
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace="serve",
                 log_to_driver=False, configure_logging=False)


def _status(args: argparse.Namespace) -> int:
    from ray import serve

    from serving.lifecycle.control import current_traffic

    _connect(args.address)
    traffic = current_traffic(args.app)
    status = serve.get_deployment_handle("Canary", args.app).status.remote().result(timeout_s=30)
    if args.json:
        print(json.dumps({"traffic": traffic, "status": status}, indent=2, default=str))
        return 0
    print(format_status(traffic, status))
    return 0


def format_status(traffic: dict, status: dict) -> str:
    """One line per arm: share, requests, errors, latency, probe and shadow figures, verdict, last gates."""
    k = (status.get("probes") or {}).get("k")
    header = (f"{'arm':<12}{'weight':>7}{'share':>7}{'requests':>9}{'errors':>7}{'p50 ms':>8}{'p99 ms':>8}"
              f"{'probe mAP@' + str(k):>14}{'recall':>7}{'overlap':>8}  verdict")
    lines = [f"primary: {traffic.get('primary')}, window {status.get('window_s')} s, probes: "
             f"{(status.get('probes') or {}).get('count', 0)} from {(status.get('probes') or {}).get('source')}"
             + (f" ({status['probes']['problem']})" if (status.get("probes") or {}).get("problem") else ""), header]
    for arm in traffic["arms"]:
        s = status.get("arms", {}).get(arm["name"], {})
        probe, shadow = s.get("probe") or {}, s.get("mirror") or {}
        verdict = s.get("verdict") or {}
        weight = f"{arm['weight']:g}{'s' if arm.get('shadow') else ''}"
        lines.append(f"{arm['name']:<12}{weight:>7}{_fmt(s.get('share'), '.0%'):>7}{s.get('requests', 0):>9}"
                     f"{s.get('errors', 0):>7}{_fmt(s.get('p50_ms'), '.1f'):>8}{_fmt(s.get('p99_ms'), '.1f'):>8}"
                     f"{_fmt(probe.get('map_at_k'), '.3f'):>14}{_fmt(probe.get('recall_at_k'), '.2f'):>7}"
                     f"{_fmt(shadow.get('overlap_at_k'), '.2f'):>8}  {verdict.get('verdict', 'no data yet')}"
                     + (f": {'; '.join(verdict['reasons'])}" if verdict.get("reasons") else ""))
        lines += _serving_lines(arm, s)
        if s.get("gates"):
            lines.append(f"{'':<12}gates: " + ", ".join(f"{g} {v.split(':', 1)[0]}" for g, v in s["gates"].items()
                                                        if g != "checked"))
        if s.get("rollback"):
            lines.append(f"{'':<12}rolled back at {s['rollback']['time']}: alias {s['rollback'].get('alias')}")
    lines.append("(weight: percent of live traffic; 's': a shadow arm, percent of requests mirrored)")
    return "\n".join(lines)


def _serving_lines(arm: dict, status: dict) -> list[str]:
    """Which version the arm serves and since when, its alias, and its latest roll-out."""
    pad, lines = f"{'':<12}", []
    serving = status.get("serving") or {}
    model = serving.get("model") or (f"models:/{status['model']['name']}/{status['model']['version']}"
                                     if status.get("model") else None)
    if model:
        lines.append(f"{pad}serves {model}" + (f" since {serving['since']}" if serving.get("since") else "")
                     + (f", following alias {arm['alias']}" if arm.get("alias") and "@" in (arm.get("model") or "")
                        else f", alias {arm['alias']}" if arm.get("alias") else ""))
    if len(serving.get("replicas") or {}) > 1:
        lines.append(f"{pad}routers: " + ", ".join(f"{n} on {m}" for m, n in sorted(serving["replicas"].items())))
    rollout = status.get("rollout")
    if rollout and rollout.get("state") != "done":
        lines.append(f"{pad}roll-out {rollout['from']} -> {rollout['to']}: {rollout['state']} since {rollout['started']}"
                     + (f" ({rollout['problem']})" if rollout.get("problem") else ""))
    if serving.get("alias_problem"):
        lines.append(f"{pad}alias not read: {serving['alias_problem']}")
    return lines


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _set(args: argparse.Namespace) -> int:
    from serving.lifecycle.control import update_traffic
    from serving.runtime.traffic import parse_weights, with_weights

    if not (args.weights or args.shadow):
        raise ValueError("give --weights and/or --shadow")
    weights = parse_weights(args.weights) if args.weights else None
    shadow = parse_weights(args.shadow) if args.shadow else None
    _connect(args.address)
    new = update_traffic(args.app, lambda traffic: with_weights(traffic, weights, shadow))
    print("traffic now: " + ", ".join(f"{a['name']}={a['weight']:g}{' (shadow)' if a['shadow'] else ''}"
                                      for a in new["arms"]))
    return 0


def _apply(args: argparse.Namespace) -> int:
    """Apply a whole settings file: arms added or removed, weights changed; unchanged applications stay."""
    import time

    from serving.app import check_arms
    from serving.lifecycle.control import apply_new_config, current_config, current_traffic, update_traffic
    from serving.runtime.serve_config import serve_config
    from serving.runtime.settings import load_settings

    settings = load_settings(args.config).with_absolute_paths()
    check_arms(settings)
    _connect(args.address)
    kept = {arm.name for arm in settings.arm_list()}
    removed = [a["name"] for a in current_traffic(args.app)["arms"] if a["name"] not in kept and a["weight"] > 0]
    if removed:  # first take their traffic away, so that no request is on them when they stop
        update_traffic(args.app, lambda traffic: _without(traffic, removed))
        time.sleep(DRAIN_S)
    http = current_config()["http_options"]
    config = serve_config(settings, host=http.get("host", "127.0.0.1"), port=int(http.get("port", 8000)))
    apply_new_config(config, args.app)
    print(f"applied {args.config}: arms " + ", ".join(f"{a.name}={a.weight:g}" for a in settings.arm_list()))
    return 0


DRAIN_S = 3.0  # between taking a removed arm's traffic away and stopping its applications


def _without(traffic: dict, removed: list[str]) -> dict:
    """The split with ``removed`` arms at weight 0, their live weight given to the primary."""
    primary = traffic.get("primary") or next(a["name"] for a in traffic["arms"] if not a["shadow"])
    moved = sum(a["weight"] for a in traffic["arms"] if a["name"] in removed and not a["shadow"])
    for arm in traffic["arms"]:
        if arm["name"] in removed:
            arm["weight"] = 0.0
        elif arm["name"] == primary:
            arm["weight"] += moved
    return traffic


def add_traffic_commands(subparsers) -> None:
    traffic = subparsers.add_parser(
        "traffic", help="see and change the split between model versions of a running app",
        description="Traffic arms are model versions (and index releases) that share a running app's requests: "
                    "live arms by weight (percent, sticky per X-Client-Id), shadow arms on copies. These "
                    "commands join the app's Ray cluster (local by default) and change the split in place, "
                    "without restarting a replica.")
    commands = traffic.add_subparsers(dest="traffic_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="Ray cluster of the app (default: $RAY_ADDRESS, else the local one)")
    common.add_argument("--app", default="terrahash", help="the router's Serve application (default: %(default)s)")

    status = commands.add_parser("status", parents=[common], help="per arm: share, requests, errors, p50/p99, "
                                 "probe mAP@k, shadow overlap@k, verdict, last gates, the version it serves",
                                 description="The canary controller's figures over its sliding window, per arm, "
                                             "and which model version each arm serves and since when (an arm "
                                             "given by alias follows it: a roll-out in progress is shown).")
    status.add_argument("--json", action="store_true", help="print the split and the figures as JSON")
    status.set_defaults(handler=_status)

    set_ = commands.add_parser("set", parents=[common], help="change the weights (and shadow copies) live",
                               description="Live arms left out of --weights get 0; the live weights must sum to "
                                           "100. An arm named in --shadow becomes a shadow arm that gets a copy "
                                           "of that percent of requests.")
    set_.add_argument("--weights", metavar="ARM=PCT,...", help="e.g. champion=90,challenger=10")
    set_.add_argument("--shadow", metavar="ARM=PCT,...", help="e.g. challenger=20")
    set_.set_defaults(handler=_set)

    apply = commands.add_parser("apply", parents=[common], help="apply a settings file: add or remove arms",
                                description="Render the serve settings file (as `terrahash serve --config`) and "
                                            "apply it to the running app: new arms' applications start, removed "
                                            "ones stop after the router has stopped sending them requests, and "
                                            "applications that did not change are left as they are.")
    apply.add_argument("--config", required=True, help="YAML file of serve settings with arms")
    apply.set_defaults(handler=_apply)
