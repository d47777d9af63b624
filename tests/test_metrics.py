"""Prometheus metrics as an operator scrapes them, after real authorizations."""

from __future__ import annotations

import asyncio
import urllib.request

from agi.server import AgiServer
from prepaid.metrics import serve_metrics
from prepaid.store import Store
from testbed.agi_peer import AgiPeer, agi_env
from testbed.servers import free_port
from tests.test_agi_fastagi import account, agi  # noqa: F401  (fixture)


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("prepaid_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_authorizations_are_counted_by_outcome(agi: tuple[Store, AgiServer]) -> None:  # noqa: F811
    store, server = agi
    port = free_port()
    serve_metrics(f"127.0.0.1:{port}")
    allowed = 'prepaid_authorizations_total{reason="",status="ALLOWED"}'
    no_credit = 'prepaid_authorizations_total{reason="NO_CREDIT",status="DENIED"}'
    before = await asyncio.to_thread(scrape, port)
    await account(store, "rich", 1_000_000)
    await account(store, "poor", 0)
    await AgiPeer(agi_env("m1", "00491701234567", callerid="rich")).call(server.port)
    await AgiPeer(agi_env("m2", "00491701234567", callerid="poor")).call(server.port)
    await AgiPeer(agi_env("m3", "00491701234567", callerid="poor")).call(server.port)
    after = await asyncio.to_thread(scrape, port)
    assert after[allowed] - before.get(allowed, 0) == 1
    assert after[no_credit] - before.get(no_credit, 0) == 2
    assert after["prepaid_authorization_seconds_count"] - before.get(
        "prepaid_authorization_seconds_count", 0) == 3
