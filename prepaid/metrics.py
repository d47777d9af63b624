"""Prometheus metrics of every service, served by ``prepaid serve`` when [metrics] listen is set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

AUTHORIZATIONS = Counter("prepaid_authorizations", "Call authorizations by outcome",
                         ["status", "reason"])
AUTHORIZATION_SECONDS = Histogram(
    "prepaid_authorization_seconds", "Time to authorize a call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LIVE_CALLS = Gauge("prepaid_live_calls", "Calls being metered now")
DEBITS = Counter("prepaid_debits", "Billing blocks paid by live calls")
DEBITED_MICROS = Counter("prepaid_debited_micros", "Micro-units charged for calls")
CUTOFFS = Counter("prepaid_cutoffs", "Calls hung up because their credit ran out")
TOPUPS = Counter("prepaid_topups", "Automatic top-ups by outcome", ["outcome"])
EMAILS = Counter("prepaid_emails", "E-mails by kind and outcome", ["kind", "outcome"])
AMI_RECONNECTS = Counter("prepaid_ami_reconnects", "Times the AMI link was re-established")
OUTBOX_LAG = Gauge("prepaid_outbox_lag", "Policy events waiting or pending in the outbox")


def serve_metrics(listen: str) -> None:
    """Expose /metrics on HOST:PORT in a daemon thread."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
