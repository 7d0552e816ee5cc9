"""The router's figures as Ray Serve metrics: requests by endpoint and status, latencies, retries, per-arm
outcomes, shadow agreement, query drift and audit failures (serving/README lists them)."""

LATENCY_BUCKETS = (.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)


class RouterMetrics:
    """Request counts by endpoint and status, latency, and retries, as Ray Serve metrics.

    Ray exports them with every replica's tags from each node's metrics endpoint, so one Prometheus
    job over Ray's service-discovery file sums them across router replicas and nodes.
    """

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("terrahash_requests", description="HTTP requests by endpoint and status",
                                        tag_keys=("endpoint", "status"))
        self.latency = metrics.Histogram("terrahash_request_seconds", description="server-side latency by endpoint",
                                         boundaries=list(LATENCY_BUCKETS), tag_keys=("endpoint",))
        self.retries = metrics.Counter("terrahash_call_retries", description="calls to other deployments retried",
                                       tag_keys=("callee", "reason"))
        self.arm_requests = metrics.Counter("terrahash_arm_requests", description="requests per traffic arm by "
                                            "outcome (ok, a failure's reason, shadow_*)", tag_keys=("arm", "outcome"))
        self.arm_latency = metrics.Histogram("terrahash_arm_request_seconds", description="latency of an arm's answers",
                                             boundaries=list(LATENCY_BUCKETS), tag_keys=("arm",))
        self.fallbacks = metrics.Counter("terrahash_arm_fallbacks", description="requests of an arm answered by the "
                                         "primary instead", tag_keys=("arm", "reason"))
        self.shadow_overlap = metrics.Histogram("terrahash_shadow_overlap", description="overlap@k of a shadow arm's "
                                                "top-k with the client's answer", boundaries=[.1, .2, .3, .4, .5, .6,
                                                                                             .7, .8, .9, .99],
                                                tag_keys=("arm",))
        # Prometheus histogram buckets must be positive: the rank correlation rho (in [-1, 1]) is exported
        # as (1 + rho) / 2, 1 for the same order, 0 for the reverse.
        self.shadow_rank = metrics.Histogram("terrahash_shadow_rank_agreement", description="(1 + Spearman's rho) "
                                             "/ 2 of the common ids of a shadow arm's and the client's top-k",
                                             boundaries=[.1, .25, .5, .75, .9, .95, .99], tag_keys=("arm",))
        self.drift = metrics.Gauge("terrahash_query_drift", description="drift statistic D of this replica's last "
                                   "window of image query codes against the index's reference (serving/index/drift.py)",
                                   tag_keys=("arm",))
        self.drift_alarm = metrics.Gauge("terrahash_query_drift_alarm", description="1 while D is above the "
                                         "index's threshold, else 0", tag_keys=("arm",))
        self.audit_failures = metrics.Counter("terrahash_audit_failures", description="requests whose audit entry "
                                              "the audit writer did not take")

    def count(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.inc(1, tags={"endpoint": endpoint, "status": str(status)})
        if seconds is not None:
            self.latency.observe(seconds, tags={"endpoint": endpoint})


_metrics: list[RouterMetrics] = []  # one per process, made in the replica (metrics need a running Ray)


def metrics() -> RouterMetrics:
    if not _metrics:
        _metrics.append(RouterMetrics())
    return _metrics[0]
