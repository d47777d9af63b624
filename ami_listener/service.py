"""``prepaid serve`` entry: real-time metering from AMI until ``stop`` is set."""

from __future__ import annotations

import asyncio
import logging

from ami_listener.meter import Meter
from ami_listener.runners import LiveRunner
from prepaid.callrecord import EXPIRY_MARGIN
from prepaid.store import Store

log = logging.getLogger(__name__)


def make_meter(store: Store) -> Meter:
    return Meter(store.ledger, prefix=store.settings.redis.key_prefix,
                 warning_seconds=store.settings.ami.warning_seconds,
                 warning_context=store.settings.ami.warning_context,
                 system_name=store.settings.ami.system_name,
                 grace_seconds=store.settings.ami.grace_seconds,
                 cdr_file=store.settings.ami.cdr_file,
                 max_hold_seconds=store.settings.billing.max_call_seconds + EXPIRY_MARGIN)


async def run(store: Store, stop: asyncio.Event) -> None:
    runner = LiveRunner(make_meter(store), store.settings.ami)
    log.info("AMI metering starting for %s:%s", store.settings.ami.host, store.settings.ami.port)
    await runner.run(stop)
    log.info("AMI metering stopped")
