"""`terrahash cluster ...`: a local multi-node Ray cluster (up, status, down: cluster/local_cluster.py), and the
cluster description (cluster/cluster.yaml) rendered for KubeRay or the Ray cluster launcher, validated
against their schemas before anything is written."""
from __future__ import annotations

import argparse
from pathlib import Path

from cluster.cluster_config import DEFAULT_CONFIG

_HEADER = ("# Rendered by `terrahash cluster render` from {config} (cluster/cluster_config.py); edit that file\n"
           "# and render again instead of editing this one.\n")


def _render(args: argparse.Namespace) -> int:
    from cluster.cluster_config import load_cluster_config
    from cluster.manifests import kuberay_problems, launcher_problems
    from cluster.render import render_kuberay, render_launcher, write_manifests

    config = load_cluster_config(args.config)
    if args.target == "kuberay":
        manifests, check = render_kuberay(config), kuberay_problems
    else:
        manifests, check = render_launcher(config), launcher_problems
    problems = [f"{name}: {problem}" for name, manifest in manifests.items() for problem in check(manifest)]
    if problems:
        raise SystemExit("the rendered manifests do not validate (nothing written):\n  " + "\n  ".join(problems))
    for path in write_manifests(manifests, args.out, _HEADER.format(config=args.config)):
        print(f"wrote {path}")
    if args.target == "kuberay":
        print(f"validated against KubeRay's CRD schemas; apply with `kubectl apply -f {args.out}/raycluster.yaml` "
              f"(or a rayjob-*.yaml, rayservice.yaml)")
    else:
        print(f"validated against Ray's cluster config schema; start it with `ray up {args.out}/cluster-launcher.yaml`")
    return 0


def _up(args: argparse.Namespace) -> int:
    from cluster.local_cluster import up

    print(f"starting a head and {args.workers} worker node(s), {args.cpus_per_node} CPU(s) each ...", flush=True)
    state = up(args.workers, args.cpus_per_node, args.head_cpus)
    print(f"cluster up: {args.workers + 1} nodes at {state.address}, jobs at {state.dashboard_url} "
          f"(token authentication on); `terrahash cluster status`, `terrahash cluster down`")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from cluster.local_cluster import status

    described = status()
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    print(f"address {described['address']}  jobs {described['dashboard_url']}  temp dir {described['temp_dir']}")
    for node in described["nodes"]:
        print(f"  {node['node']:<10} {'alive' if node['alive'] else 'dead ':<6} {node['cpus']:g} CPU  "
              f"{node['gpus']:g} GPU  {node['node_id'][:12]}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from cluster.local_cluster import ClusterState, down

    state = ClusterState.load()
    stopped = down(state)
    print(f"cluster at {state.address} down ({stopped} process(es) stopped)")
    return 0


def add_cluster_commands(subparsers) -> None:
    cluster = subparsers.add_parser("cluster", help="a local multi-node cluster; cluster configs for KubeRay or VMs",
                                    description="`up`, `status` and `down` run a real multi-node Ray cluster on this "
                                                "machine, the default cluster of `submit` and `jobs`. The cluster "
                                                "TerraHash runs on elsewhere is described once in a YAML file "
                                                "(default: cluster/cluster.yaml: image, node types, artifact root, "
                                                "MLflow URI, jobs, serve settings) and `render`ed per target.")
    commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    start = commands.add_parser("up", help="start a head and N worker nodes on this machine",
                                description="Start a Ray head and --workers worker nodes on this machine, each its own "
                                            "raylet with --cpus-per-node CPUs and a custom resource terrahash-node-<i> "
                                            "(0 is the head), token authentication on. Its address is recorded in "
                                            "$TERRAHASH_HOME/cluster.json (default ~/.terrahash).")
    start.add_argument("--workers", type=int, default=2, help="worker nodes (default: %(default)s)")
    start.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of each node (default: %(default)s)")
    start.add_argument("--head-cpus", type=int, default=None,
                       help="CPUs of the head (default: --cpus-per-node; 0 keeps tasks off the head)")
    start.set_defaults(handler=_up)
    show = commands.add_parser("status", help="the local cluster's nodes", description="Nodes of the cluster "
                               "`terrahash cluster up` started: alive or not, CPUs, GPUs, node id.")
    show.add_argument("--json", action="store_true", help="print the status as JSON")
    show.set_defaults(handler=_status)
    stop = commands.add_parser("down", help="stop the local cluster", description="Stop every process of the cluster "
                               "`terrahash cluster up` started (and no other Ray on this machine).")
    stop.set_defaults(handler=_down)
    render = commands.add_parser("render", help="write the manifests of a target, validated",
                                 description="Write KubeRay manifests (a RayCluster, one RayJob per job, a RayService "
                                             "whose serveConfigV2 is the Serve config `terrahash serve --render` "
                                             "writes) or a Ray cluster launcher YAML (`ray up`), one file per "
                                             "resource, after validating each against its schema (KubeRay's CRDs, "
                                             "strictly; Ray's cluster config schema; Serve's config schema).")
    render.add_argument("--target", required=True, choices=("kuberay", "launcher"))
    render.add_argument("--out", required=True, metavar="DIR", help="folder to write the YAML files to")
    render.add_argument("--config", default=str(DEFAULT_CONFIG.relative_to(Path.cwd()) if
                                                DEFAULT_CONFIG.is_relative_to(Path.cwd()) else DEFAULT_CONFIG),
                        help="the cluster description (default: %(default)s)")
    render.set_defaults(handler=_render)
