"""Customer e-mail: templates, a durable mail queue in Redis, and the SMTP sender.

A mail is rendered when it is queued and stored whole in the stream ``<prefix>:{mail}``;
its record ``<prefix>:{mail}:<id>`` (state queued/sent/failed) makes queueing and sending
idempotent: the same mail id is queued once, and once the SMTP server accepted it a
retry does not send it again.  Both share the hash tag ``{mail}``, so queueing and
finishing a mail touch one Redis Cluster slot.  The mail worker reads the stream with a
consumer group, acknowledges only after the server accepted (or refused for good), and retries with
backoff while the server is down.
"""

from __future__ import annotations

import asyncio
import functools
import html
import logging
import re
import socket
import string
import time
from collections.abc import Mapping
from email import message_from_bytes, policy
from email.message import EmailMessage
from importlib import resources
from pathlib import Path
from typing import Any

import aiosmtplib
from redis.exceptions import RedisClusterException, RedisError

from policy.decide import retry_delay
from prepaid import keys, lua, metrics
from prepaid.config import SmtpSettings
from prepaid.deadletters import DeadLetters
from prepaid.errors import ConfigError
from prepaid.outage import OutageLog
from prepaid.redis_client import REDIS_ERRORS, RedisClient
from prepaid.streams import ConsumerGroup

log = logging.getLogger(__name__)


def _kind(mail_id: str) -> str:
    """The metric label of a mail id like ``low:1001:<crossing>``."""
    return mail_id.split(":", 1)[0]

KINDS = ("low_balance", "topup_receipt", "topup_failed", "manual_receipt", "phone_receipt",
         "phone_failed", "support_request")
GROUP = "mailers"
RECORD_TTL = 30 * 86400


class Templates:
    """``string.Template`` files: ``<kind>.txt`` (first line ``Subject: ...``) and ``<kind>.html``.

    A file in the admin's directory (``[smtp] templates``) overrides the built-in one.
    """

    def __init__(self, override_dir: Path | None = None) -> None:
        self.override_dir = override_dir

    def source(self, name: str) -> tuple[str, str]:
        if self.override_dir is not None and (self.override_dir / name).is_file():
            path = self.override_dir / name
            return path.read_text(encoding="utf-8"), str(path)
        return resources.files("policy").joinpath("templates", name).read_text("utf-8"), name

    def _fill(self, name: str, values: Mapping[str, str]) -> str:
        text, where = self.source(name)
        try:
            return string.Template(text).substitute(values)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"mail template {where}: unknown or bad placeholder {exc}") from None

    def render(self, kind: str, context: Mapping[str, str]) -> tuple[str, str, str]:
        """(subject, plain text, HTML); HTML values are escaped."""
        if kind not in KINDS:
            raise ValueError(f"unknown mail kind {kind!r}")
        text = self._fill(f"{kind}.txt", context)
        first, _, body = text.partition("\n")
        if not first.startswith("Subject:"):
            raise ConfigError(f"mail template {kind}.txt must start with a 'Subject: ' line")
        subject = first.removeprefix("Subject:").strip()
        page = self._fill(f"{kind}.html", {k: html.escape(v) for k, v in context.items()})
        return subject, body.lstrip("\n"), page


@functools.cache
def _host() -> str:
    """The domain of Message-IDs; looked up once (getfqdn may ask DNS)."""
    return socket.getfqdn()


def compose(templates: Templates, sender: str, to: str, kind: str,
            context: Mapping[str, str], mail_id: str) -> EmailMessage:
    """Render ``kind``; if an admin's override is broken, log it and use the built-in one."""
    try:
        subject, text, page = templates.render(kind, context)
    except ConfigError as exc:
        log.error("%s; using the built-in template", exc)
        subject, text, page = Templates().render(kind, context)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{re.sub(r'[^A-Za-z0-9.-]', '.', mail_id)}@{_host()}>"
    msg["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    msg.set_content(text)
    msg.add_alternative(page, subtype="html")
    return msg


class MailQueue:
    def __init__(self, client: RedisClient, prefix: str = "prepaid") -> None:
        self.redis = client
        self.prefix = prefix
        self._enqueue = client.register_script(lua.MAIL_ENQUEUE)

    @property
    def stream_key(self) -> str:
        return keys.mail_stream(self.prefix)

    def record_key(self, mail_id: str) -> str:
        return keys.mail_record(self.prefix, mail_id)

    async def enqueue(self, mail_id: str, msg: EmailMessage) -> bool:
        """Queue ``msg`` once under ``mail_id``; False if that id was queued before."""
        made = await self._enqueue(
            keys=[self.record_key(mail_id), self.stream_key],
            args=[mail_id, str(msg["To"]), msg.as_bytes(), f"{time.time():.3f}", RECORD_TTL])
        return bool(made)

    async def state(self, mail_id: str) -> str:
        raw: Any = await self.redis.hget(self.record_key(mail_id), "state")
        return raw.decode() if raw else ""


class SmtpSender:
    """Sends through the configured server; one connection per batch."""

    def __init__(self, smtp: SmtpSettings) -> None:
        self.smtp = smtp

    def connection(self) -> aiosmtplib.SMTP:
        s = self.smtp
        return aiosmtplib.SMTP(hostname=s.host, port=s.port, timeout=s.timeout,
                               start_tls=s.starttls, username=s.username or None,
                               password=s.password or None)


def _permanent(exc: Exception) -> bool:
    """A 5xx answer about this message: retrying will not help."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code >= 500 for r in exc.recipients)
    if isinstance(exc, (aiosmtplib.SMTPDataError, aiosmtplib.SMTPSenderRefused,
                        aiosmtplib.SMTPRecipientRefused)):
        return exc.code >= 500
    return False


# SMTP or Redis away: the batch waits and is retried (with back-off), never counted.
_OUTAGES = (RedisError, RedisClusterException, aiosmtplib.SMTPException, OSError, TimeoutError)


class MailWorker:
    def __init__(self, client: RedisClient, smtp: SmtpSettings, *, prefix: str = "prepaid",
                 consumer: str | None = None, claim_idle_ms: int = 60_000,
                 batch: int = 20, dead_letter_after: int = 5) -> None:
        self.redis = client
        self.queue = MailQueue(client, prefix)
        self.sender = SmtpSender(smtp)
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.claim_idle_ms = claim_idle_ms
        self.batch = batch
        self.smtp_outage = OutageLog(log, f"SMTP server {smtp.host}:{smtp.port}")
        self.redis_outage = OutageLog(log, "Redis (mail queue)")
        # Its own failures again at once: run() backs off while SMTP or Redis is down.
        self.group = ConsumerGroup(client, self.queue.stream_key, GROUP, self.consumer,
                                   claim_idle_ms=claim_idle_ms, retry_idle_ms=0, batch=batch,
                                   dead_letters=DeadLetters(client, prefix),
                                   dead_letter_after=dead_letter_after)

    async def ensure_group(self) -> None:
        await self.group.ensure()

    async def process_batch(self, block_ms: int | None = None) -> int:
        """Send what is waiting; return how many mails were sent or given up.

        Raises nothing for outages: they are logged once and the mails stay queued.
        """
        try:
            rows = await self.group.fetch(block_ms)
        except REDIS_ERRORS as exc:
            self.redis_outage.failure(exc)
            return 0
        self.redis_outage.success()
        if not rows:
            return 0
        done = 0
        try:
            async with self.sender.connection() as smtp:
                for entry_id, fields in rows:
                    try:
                        done += await self._one(smtp, entry_id, fields)
                    except _OUTAGES:
                        raise
                    except Exception as exc:  # this mail only (a bad record, a bug)
                        done += await self.group.failed(entry_id, fields, exc)
        except (RedisError, RedisClusterException) as exc:
            self.redis_outage.failure(exc)
            return done
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.smtp_outage.failure(exc)
            return done
        self.smtp_outage.success()
        return done

    async def _one(self, smtp: aiosmtplib.SMTP, entry_id: str, fields: dict[bytes, bytes]) -> int:
        key = self.queue.stream_key
        mail_id = fields.get(b"id", b"").decode()
        raw = fields.get(b"message")
        if not mail_id or raw is None:
            log.error("mail queue entry %s is malformed; dropping it", entry_id)
            await self.redis.xack(key, GROUP, entry_id)
            return 1
        record = self.queue.record_key(mail_id)
        if await self.queue.state(mail_id) in ("sent", "failed"):
            await self.redis.xack(key, GROUP, entry_id)  # accepted before; do not send again
            return 1
        msg = message_from_bytes(raw, policy=policy.default)
        try:
            await smtp.send_message(msg)
        except aiosmtplib.SMTPException as exc:
            if not _permanent(exc):
                raise
            log.error("mail %s to %s refused for good by the SMTP server: %s", mail_id,
                      msg["To"], exc)
            await self._finish(record, entry_id, "failed")
            metrics.EMAILS.labels(_kind(mail_id), "refused").inc()
            return 1
        await self._finish(record, entry_id, "sent")
        metrics.EMAILS.labels(_kind(mail_id), "sent").inc()
        log.info("mail %s sent to %s", mail_id, msg["To"])
        return 1

    async def _finish(self, record: str, entry_id: str, state: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(record, mapping={"state": state, state: f"{time.time():.3f}"})
            pipe.xack(self.queue.stream_key, GROUP, entry_id)
            await pipe.execute()

    async def run(self, stop: asyncio.Event, block_ms: int = 500) -> None:
        """Send mail until ``stop`` is set, backing off while SMTP or Redis is down."""
        while not stop.is_set():
            await self.process_batch(block_ms)
            failures = max(self.smtp_outage.failures, self.redis_outage.failures)
            if failures:
                try:
                    await asyncio.wait_for(stop.wait(), retry_delay(failures, cap=60.0))
                except TimeoutError:
                    pass
