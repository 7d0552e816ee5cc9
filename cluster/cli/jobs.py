"""`terrahash submit -- SUBCOMMAND ...` and `terrahash jobs list|status|logs|stop|wait` (cluster/jobs.py)."""
from __future__ import annotations

import argparse
import time


def _pairs(values: list[str], what: str, number: bool = False) -> dict:
    out = {}
    for value in values:
        key, sep, amount = value.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what}: expected NAME=VALUE, got {value!r}")
        try:
            out[key] = float(amount) if number else amount
        except ValueError:
            raise SystemExit(f"{what}: {value!r}: the amount must be a number") from None
    return out


def _submit(args: argparse.Namespace) -> int:
    from cluster.jobs import EXIT_CODES, WORKER_RESOURCE, submit, worker_type_env

    command = args.subcommand[1:] if args.subcommand[:1] == ["--"] else args.subcommand
    resources = {} if args.on_head else {WORKER_RESOURCE: 0.01}
    resources.update(_pairs(args.entrypoint_resource, "--entrypoint-resource", number=True))
    env = {} if args.on_head and args.worker_type is None else worker_type_env(args.worker_type, args.address,
                                                                                args.cluster_config)
    env.update(_pairs(args.env, "--env"))
    if args.print_id and not args.no_follow:
        raise SystemExit("terrahash submit: --print-id goes with --no-follow")
    job_id, outcome = submit(command, address=args.address, retries=args.retries, after=args.after,
                             do_follow=not args.no_follow, env=env, module=args.module,
                             entrypoint_cpus=args.entrypoint_cpus, entrypoint_resources=resources,
                             say=(lambda line: None) if args.print_id else print)
    if args.print_id:
        print(job_id)
        return 0
    if outcome is None:
        print(f"`terrahash jobs logs {job_id} --follow` to watch it, `terrahash jobs stop {job_id}` to stop it")
        return 0
    return EXIT_CODES.get(outcome, 1)


def _when(seconds_ms) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds_ms / 1000)) if seconds_ms else "-"


def _jobs(args: argparse.Namespace) -> int:
    from cluster import jobs

    action = args.jobs_command
    if action == "list":
        rows = jobs.list_jobs(args.address)
        if args.json:
            print(jobs.dumps(rows))
            return 0
        for row in rows:
            print(f"{row['id']:<52} {row['status']:<10} {_when(row['start_time'])}  {row['entrypoint'][:60]}")
        if not rows:
            print("no jobs")
        return 0
    if action == "status":
        info = jobs.describe(args.id, args.address)
        print(jobs.dumps(info) if args.json else f"{info['id']}: {info['status']}  {info['message'] or ''}".rstrip())
        return 0
    if action == "logs":
        if args.follow:
            return jobs.EXIT_CODES.get(jobs.follow(args.id, args.address), 1)
        print(jobs.logs(args.id, args.address), end="")
        return 0
    if action == "stop":
        stopped = jobs.stop(args.id, args.address)
        print(f"asked {args.id} to stop" if stopped else f"{args.id} had already ended")
        return 0
    outcome = jobs.wait(args.id, args.address, retries=True, say=lambda line: print(line, flush=True))  # wait
    print(f"job {args.id}: {outcome}", flush=True)
    return jobs.EXIT_CODES.get(outcome, 1)


def add_job_commands(subparsers) -> None:
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", default=None, metavar="URL",
                         help="the cluster's job server (default: $RAY_ADDRESS when it is an http URL, else the "
                              "cluster `terrahash cluster up` started)")
    submit = subparsers.add_parser(
        "submit", parents=[address], help="run a TerraHash subcommand as a Ray job on a cluster",
        description="Submit `terrahash SUBCOMMAND ARGS` as a Ray job: the project ships as the job's working_dir with "
                    "the MLflow, S3 and data settings of this shell; the job gets a readable id and metadata "
                    "(command, config hash, git commit, who submitted it). Its logs stream here until it ends, and "
                    "the exit status is the job's (0 succeeded, 1 failed, 3 stopped).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  terrahash submit --retries 2 -- train --config fast --workers 2 --storage s3://bucket/ray\n"
               "  terrahash submit --worker-type gpu --module evaluation.bench_gpu_train -- --config full")
    submit.add_argument("--retries", type=int, default=0, metavar="N",
                        help="resubmit a failed job (not a stopped one) up to N times, each attempt resuming from "
                             "the last checkpoint the previous one reported")
    submit.add_argument("--after", metavar="ID", help="run only once job ID has succeeded (waits on the cluster)")
    submit.add_argument("--no-follow", action="store_true", help="print the job id and return at once")
    submit.add_argument("--print-id", action="store_true",
                        help="with --no-follow, print only the job id, for scripts: "
                             "ID=$(terrahash submit --no-follow --print-id -- train ...)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable of the job (repeatable)")
    submit.add_argument("--entrypoint-cpus", type=float, default=0.0,
                        help="CPUs reserved for the job's driver (default: %(default)s)")
    submit.add_argument("--entrypoint-resource", action="append", default=[], metavar="NAME=AMOUNT",
                        help="a custom resource the driver needs (repeatable)")
    submit.add_argument("--on-head", action="store_true",
                        help="let the driver (and Ray Train workers) run on the head node (by default they need a "
                             "worker node's terrahash-worker)")
    submit.add_argument("--worker-type", metavar="TYPE",
                        help="run the job's Ray Train workers on nodes of this worker type, which also decides "
                             "their GPU and CPUs (the cluster description's workers: cpu, gpu...; the local "
                             "cluster's nodes are cpu; default: any worker node)")
    submit.add_argument("--cluster-config", metavar="FILE",
                        help="the cluster description --worker-type is read from (default: cluster/cluster.yaml)")
    submit.add_argument("--module", metavar="MODULE",
                        help="run `python -m MODULE ARGS` instead of a TerraHash subcommand (a benchmark, say)")
    submit.add_argument("subcommand", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ARGS",
                        help="the TerraHash command to run, after --")
    submit.set_defaults(handler=_submit)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow and stop submitted jobs",
                                 description="The jobs of a cluster's job server (see `terrahash submit`).")
    commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = commands.add_parser("list", parents=[address], help="every job, newest first")
    listing.add_argument("--json", action="store_true")
    one = commands.add_parser("status", parents=[address], help="a job's status, message and metadata")
    one.add_argument("id")
    one.add_argument("--json", action="store_true")
    tail = commands.add_parser("logs", parents=[address], help="a job's logs")
    tail.add_argument("id")
    tail.add_argument("--follow", action="store_true", help="stream them until the job ends; exit with its status")
    halt = commands.add_parser("stop", parents=[address], help="stop a job")
    halt.add_argument("id")
    hold = commands.add_parser("wait", parents=[address], help="wait until a job ends; exit 0 only if it succeeded",
                               description="Wait until a job ends, following a failed job into the next attempts "
                                           "its --retries leave; exit 0 only if it (or its last attempt) succeeded.")
    hold.add_argument("id")
    for parser in (listing, one, tail, halt, hold):
        parser.set_defaults(handler=_jobs)
