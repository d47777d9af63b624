"""Prometheus metrics of every service, served by ``prepaid serve`` when [metrics] listen is set.

``prepaid serve`` runs each service in its own process (shell/serve.py), and only the
supervisor serves /metrics: the services' metrics use prometheus_client's multiprocess mode
(each child writes its values to files in a directory the supervisor made and names in the
children's ``PROMETHEUS_MULTIPROC_DIR``; counters of a child that died stay counted), and
the supervisor adds its own, kept apart in :data:`SERVE_REGISTRY` (restarts, dependency
health). No port is shared and no value goes through Redis. A service run in-process
(``serve --only agi``, the tests) serves the default registry beside :data:`SERVE_REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

AUTHORIZATIONS = Counter("prepaid_authorizations", "Call authorizations by outcome",
                         ["status", "reason"])
AUTHORIZATION_SECONDS = Histogram(
    "prepaid_authorization_seconds", "Time to authorize a call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
# multiprocess_mode: how the supervisor adds up children's gauges (ignored in one process);
# 'live' drops the value of a child that died.
LIVE_CALLS = Gauge("prepaid_live_calls", "Calls being metered now", multiprocess_mode="livesum")
DEBITS = Counter("prepaid_debits", "Billing blocks paid by live calls")
DEBITED_MICROS = Counter("prepaid_debited_micros", "Micro-units charged for calls")
CUTOFFS = Counter("prepaid_cutoffs", "Calls hung up because their credit ran out")
TOPUPS = Counter("prepaid_topups", "Automatic top-ups by outcome", ["outcome"])
EMAILS = Counter("prepaid_emails", "E-mails by kind and outcome", ["kind", "outcome"])
AGI_REFUSED = Counter("prepaid_agi_refused",
                      "FastAGI requests refused before any lookup, by why (secret: without "
                      "[agi] secret or with a wrong one; allow; connections; per_client)",
                      ["why"])
HOLDS_REAPED = Counter("prepaid_holds_reaped",
                       "Holds of calls no longer on their server, given back by its listener")
AMI_RECONNECTS = Counter("prepaid_ami_reconnects", "Times the AMI link was re-established")
DEAD_LETTERS = Counter("prepaid_dead_letters",
                       "Stream events parked in the dead-letter stream after failing "
                       "[policy] dead_letter_after times, by source stream", ["stream"])
EVENT_FAILURES = Counter("prepaid_event_failures",
                         "Failed handlings of a stream event (a bad record, a bug), by stream",
                         ["stream"])
OUTBOX_LAG = Gauge("prepaid_outbox_lag", "Policy events waiting or pending in the outbox",
                   multiprocess_mode="livemax")

# Set by prepaid serve itself (the supervisor), never by a service child.
SERVE_REGISTRY = CollectorRegistry()
SERVICE_RESTARTS = Counter("prepaid_service_restarts",
                           "Times a service of prepaid serve died and was restarted",
                           ["service"], registry=SERVE_REGISTRY)
DEAD_LETTERS_WAITING = Gauge("prepaid_dead_letters_waiting",
                             "Events in the dead-letter stream now (prepaid dead-letters)",
                             registry=SERVE_REGISTRY)
DEPENDENCY_UP = Gauge("prepaid_dependency_up",
                      "1 when a dependency answers (redis; metering: this server's listener "
                      "beats 'up' and fresh), else 0", ["dependency"], registry=SERVE_REGISTRY)
METERING_STATE = Gauge("prepaid_metering_state",
                       "1 for the state of each server's metering heartbeat (up, behind, down, "
                       "missing), 0 for the others", ["system", "state"],
                       registry=SERVE_REGISTRY)
METERING_BACKLOG = Gauge("prepaid_metering_backlog",
                         "AMI events read but not yet metered, as the last heartbeat said",
                         ["system"], registry=SERVE_REGISTRY)
METERING_BEAT_AGE = Gauge("prepaid_metering_beat_age_seconds",
                          "Seconds since the listener's last heartbeat", ["system"],
                          registry=SERVE_REGISTRY)


class _Forward:
    """Collects another registry, so one /metrics page serves two of them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


def metrics_registry(multiprocess_dir: str | None = None) -> CollectorRegistry:
    """What /metrics shows: the services' metrics (this process's, or every child's files
    in ``multiprocess_dir``) and prepaid serve's own."""
    registry = CollectorRegistry()
    if multiprocess_dir is not None:
        MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Forward(REGISTRY))
    registry.register(_Forward(SERVE_REGISTRY))
    return registry


def serve_metrics(listen: str, *, multiprocess_dir: str | None = None) -> Any:
    """Expose /metrics on HOST:PORT in a daemon thread; returns the HTTP server (its
    ``shutdown()`` stops it). Raises OSError when the port cannot be bound."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                        registry=metrics_registry(multiprocess_dir))
    return server
