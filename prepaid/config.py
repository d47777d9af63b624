"""Configuration: one TOML file parsed once into frozen settings; errors name the key and file.

Secrets may come from the environment instead of the file: ``PREPAID_REDIS_URL``,
``PREPAID_AMI_SECRET``, ``PREPAID_AGI_SECRET``, ``PREPAID_SMTP_PASSWORD``,
``PREPAID_WEB_SECRET``, ``STRIPE_API_KEY`` and ``STRIPE_WEBHOOK_SECRET``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prepaid.errors import ConfigError, InputError
from prepaid.inputs import check_email
from prepaid.money import check_currency, currency_decimals, parse_amount
from prepaid.ratedeck import DEFAULT_PLAN, Normalisation, check_plan
from prepaid.redis_client import check_url, mask_url, url_has_secret

ENV_CONFIG = "PREPAID_CONFIG"
DEFAULT_PATHS = (Path("/etc/asterisk-prepaid/prepaid.toml"),)
ACCOUNT_SOURCES = ("variable", "accountcode", "callerid")
# Caller ID is set by the caller (a SIP From header): opt-in only, never a default.
DEFAULT_ACCOUNT_SOURCES = ("variable", "accountcode")
LOOPBACK = ("127.0.0.0/8", "::1")
ACTIONS = ("none", "email", "topup")


@dataclass(frozen=True)
class RedisSettings:
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    key_prefix: str = "prepaid"
    timeout: float = 2.0
    max_connections: int = 256  # per process; a burst beyond waits up to `timeout`

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages and logs."""
        return mask_url(self.url)


@dataclass(frozen=True)
class BillingSettings:
    currency: str = "EUR"
    rates: Path | None = None
    # The plan (rate deck) of new accounts without --plan, and of 'prepaid rates' commands.
    default_plan: str = DEFAULT_PLAN
    international_prefixes: tuple[str, ...] = ("+", "00")
    national_prefix: str = ""
    country_code: str = ""
    max_call_seconds: int = 3 * 3600

    @property
    def decimals(self) -> int:
        return currency_decimals(self.currency)

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation(self.international_prefixes, self.national_prefix, self.country_code)


@dataclass(frozen=True)
class AmiSettings:
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "prepaid"
    secret: str = field(default="", repr=False)
    reconnect_max_seconds: float = 30.0
    warning_seconds: int = 60
    # The dialplan plays the credit warning itself (Dial's L()); with a context here (and
    # write=originate for the AMI user), the listener also whispers one into a call whose
    # credit runs out earlier or later than its authorization foresaw. Empty: never.
    warning_context: str = ""
    # The systemname of this Asterisk (asterisk.conf); with several servers on one Redis,
    # each listener resumes and settles only the calls whose uniqueid carries its name.
    system_name: str = ""
    # A restart, crash or dropped AMI session shorter than this drops no live call: each
    # call's hard limit (TIMEOUT(absolute)) runs this long past its paid time, so the
    # overspend while the listener is away is at most this many seconds a call.
    grace_seconds: int = 30
    # cdr_custom's prepaid.csv (asterisk-conf/cdr_custom.conf): how calls that ended while
    # the listener was away are billed their CDR billsec. Empty: not read.
    cdr_file: Path | None = None
    # Events read but not yet metered; when full, metering is 'behind' and new calls are
    # refused until it has caught up.
    queue_size: int = 20_000
    # Metering counts as behind (new calls refused, ERROR NO_METERING) once it meters events,
    # or pays blocks, this many seconds late: a call allowed then would be metered late.
    behind_seconds: float = 10.0
    # How often the listener gives back holds of this server's calls that nobody meters
    # (their record released or gone, or older than [billing] max_call_seconds + 1 h).
    reap_seconds: float = 60.0


@dataclass(frozen=True)
class AgiSettings:
    listen: str = "127.0.0.1:4573"
    account_sources: tuple[str, ...] = DEFAULT_ACCOUNT_SOURCES
    fail_open: bool = False
    hangup_on_deny: bool = True
    timeout: float = 3.0
    warning_ms: int = 60_000
    allow: tuple[str, ...] = LOOPBACK  # client networks allowed to connect
    header_timeout: float = 5.0
    ring_seconds: int = 60  # Dial's ring timeout; part of the call's first TIMEOUT(absolute)
    command_timeout: float = 30.0
    max_connections: int = 1000
    # Connections open at once from one address: one client cannot take every slot.
    max_connections_per_client: int = 500
    # While an authorization in progress has taken longer than this, new calls are refused
    # at once (ERROR, BUSY) instead of waiting out `timeout` on an overloaded server.
    busy_seconds: float = 2.5
    # Refuse new calls (ERROR, NO_METERING) once this server's metering has been away, or
    # behind, for longer than this; allow_unmetered = true lets them through unbilled.
    metering_stale_seconds: float = 5.0
    allow_unmetered: bool = False
    # The *101 menu waits this long for the policy worker to charge a top-up; a request it
    # stops waiting for is never charged later (prepaid/selfservice.py).
    topup_wait_seconds: float = 20.0
    # Authorization outcomes, allowed and refused, kept per account for `prepaid calls
    # ACCOUNT --refused`: about this many, for at most this many days (0: none kept).
    outcomes_keep: int = 1000
    outcomes_days: int = 30
    # Asterisk passes it as the first AGI argument of every request; a request without it
    # is refused. Empty: none asked, allowed only while `allow` is loopback only.
    secret: str = field(default="", repr=False)

    @property
    def loopback_only(self) -> bool:
        """Every network in `allow` is on this host (127.0.0.0/8, ::1)."""
        loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
        nets = [ipaddress.ip_network(entry.strip(), strict=False) for entry in self.allow]
        return all(any(net.version == lo.version and net.subnet_of(lo)  # type: ignore[arg-type]
                       for lo in loopback) for net in nets)

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 25
    username: str = ""
    password: str = field(default="", repr=False)
    sender: str = "prepaid@localhost"
    starttls: bool = False
    timeout: float = 10.0
    templates: Path | None = None


@dataclass(frozen=True)
class PolicySettings:
    threshold: int = 0  # micro-units; default for new accounts
    action: str = "none"
    topup_amount: int = 0
    presets: tuple[int, ...] = (5_000_000, 10_000_000, 20_000_000, 50_000_000)
    max_topup: int = 100_000_000
    daily_topups: int = 3
    daily_topup_amount: int = 200_000_000
    max_declines: int = 3
    decline_backoff_seconds: int = 3600
    claim_idle_seconds: float = 60.0  # an event unacknowledged this long goes to another worker
    topup_lock_seconds: int = 120
    gateway_max_attempts: int = 5
    sweep_seconds: float = 30.0  # how often lost crossing events are looked for
    # An event (policy, phone top-up, mail) whose handling failed this many times (a bad
    # record, a bug; outages do not count) is parked in the dead-letter stream.
    dead_letter_after: int = 5


@dataclass(frozen=True)
class PaymentsSettings:
    gateway: str = "sandbox"
    stripe_api_key: str = field(default="", repr=False)
    stripe_api_base: str = ""
    # Stripe's signing secret of the web page's webhook endpoint (whsec_...).
    stripe_webhook_secret: str = field(default="", repr=False)


@dataclass(frozen=True)
class WebSettings:
    """The "My account" page (policy/web/). Off while `listen` is empty."""

    listen: str = ""  # HOST:PORT; loopback unless cert and key are set
    cert: Path | None = None  # PEM certificate (chain) and key: served over HTTPS
    key: Path | None = None
    # Behind a reverse proxy that ends TLS on this host: its X-Forwarded-Proto/-For are
    # believed from loopback only, and the page is HTTPS (Secure cookies, HSTS).
    proxy: bool = False
    public_url: str = ""  # https://host/ as customers reach it (Checkout's return URLs)
    secret: str = field(default="", repr=False)  # signs sessions; empty: random per start
    session_minutes: int = 30
    support_email: str = ""  # where support requests (larger top-ups) are e-mailed
    reconcile_seconds: float = 300.0  # how often Stripe is asked for unseen payments
    page_size: int = 10  # history entries and calls per page

    @property
    def https(self) -> bool:
        return self.cert is not None or self.proxy

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = ""  # HOST:PORT for Prometheus /metrics; empty: off


@dataclass(frozen=True)
class LedgerSettings:
    # How long an idempotency key is remembered: a retry within this many days is a
    # duplicate, one later is applied again. At least 8: a settled call's record waits 7
    # days for its call history (prepaid/callrecord.py FINISHED_TTL), its retries with it.
    idempotency_days: int = 10


@dataclass(frozen=True)
class ArchiveSettings:
    # `prepaid archive` moves history and calls older than this many days to monthly files
    # under `dir` (JSON lines or CSV), then trims them from Redis.
    retention_days: int = 90
    dir: Path = Path("/var/lib/asterisk-prepaid/archive")
    format: str = "jsonl"
    daily: bool = False  # `prepaid serve` (its policy service) archives once a day


@dataclass(frozen=True)
class Settings:
    source: str = "<defaults>"
    redis: RedisSettings = field(default_factory=RedisSettings)
    billing: BillingSettings = field(default_factory=BillingSettings)
    ami: AmiSettings = field(default_factory=AmiSettings)
    agi: AgiSettings = field(default_factory=AgiSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    payments: PaymentsSettings = field(default_factory=PaymentsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    web: WebSettings = field(default_factory=WebSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)


# Keys whose TOML value is an amount in currency units; they are stored in micro-units.
_MONEY_KEYS = {("policy", "threshold"), ("policy", "topup_amount"), ("policy", "max_topup"),
               ("policy", "daily_topup_amount")}
_RENAMED = {("smtp", "from"): "sender"}  # TOML name -> attribute
_ENV = {("redis", "url"): "PREPAID_REDIS_URL", ("ami", "secret"): "PREPAID_AMI_SECRET",
        ("agi", "secret"): "PREPAID_AGI_SECRET",
        ("smtp", "password"): "PREPAID_SMTP_PASSWORD",
        ("payments", "stripe_api_key"): "STRIPE_API_KEY",
        ("payments", "stripe_webhook_secret"): "STRIPE_WEBHOOK_SECRET",
        ("web", "secret"): "PREPAID_WEB_SECRET"}


def _amounts(value: Any, name: str, where: str) -> int | tuple[int, ...]:
    """An amount, or a list of them (``[policy] presets``), in micro-units."""
    out = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, str, float)):
            raise ConfigError(f"{where}: {name} must be an amount like \"5.00\"")
        try:
            out.append(parse_amount(str(item), what=name, allow_zero=True))
        except InputError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(out) if isinstance(value, list) else out[0]


def _path(value: Any, name: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {name} must be a path")
    path = Path(value)
    # Relative paths are relative to the config file, not to where the command runs.
    return path if path.is_absolute() or where.startswith("<") else Path(where).parent / path


def _convert(section: str, key: str, value: Any, default: Any, where: str) -> Any:
    name = f"[{section}] {key}"
    if (section, key) in _MONEY_KEYS or (section, key) == ("policy", "presets"):
        return _amounts(value, name, where)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: {name} must be a whole number >= 0, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{where}: {name} must be a positive number, not {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {name} must be a list of strings")
        return tuple(value)
    if default is None or isinstance(default, Path):
        return _path(value, name, where)
    if not isinstance(value, str):
        shown = "another type" if (section, key) in _ENV else repr(value)  # never a secret
        raise ConfigError(f"{where}: {name} must be a string, not {shown}")
    return value


def _section(cls: type[Any], section: str, table: Mapping[str, Any], where: str,
             env: Mapping[str, str]) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        attr = _RENAMED.get((section, key), key)
        if attr not in known:
            raise ConfigError(f"{where}: unknown key [{section}] {key}")
        values[attr] = _convert(section, key, value, getattr(cls(), attr), where)
    for (sec, key), var in _ENV.items():
        if sec == section and env.get(var):
            values[key] = env[var]
    return cls(**values)


def _validate_agi(agi: AgiSettings, where: str) -> None:
    if not re.fullmatch(r"[^:\s]+:[0-9]{1,5}|\[[0-9a-fA-F:]+\]:[0-9]{1,5}", agi.listen):
        raise ConfigError(f"{where}: [agi] listen {agi.listen!r} must be HOST:PORT")
    if not agi.allow:
        raise ConfigError(f"{where}: [agi] allow is empty; list the networks of your Asterisk "
                          "servers, e.g. [\"127.0.0.1\", \"10.0.0.5\"] (the default is "
                          "loopback only; [\"0.0.0.0/0\", \"::/0\"] is any client)")
    for entry in agi.allow:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"{where}: [agi] allow entry {entry!r} is not an address or "
                              "network like 127.0.0.1 or 10.0.0.0/8") from None
    if not agi.secret and not agi.loopback_only:
        raise ConfigError(f"{where}: [agi] allow lets other hosts connect, so [agi] secret "
                          "(or PREPAID_AGI_SECRET) must be set: a long random string, also "
                          "set as PREPAID_AGI_SECRET in extensions.conf [globals]")
    bad = [x for x in agi.account_sources if x not in ACCOUNT_SOURCES]
    if bad or not agi.account_sources:
        raise ConfigError(f"{where}: [agi] account_sources may hold only "
                          f"{', '.join(ACCOUNT_SOURCES)}")


_HOSTPORT = r"[^:\s]+:[0-9]{1,5}|\[[0-9a-fA-F:]+\]:[0-9]{1,5}"


def _loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_web(web: WebSettings, where: str) -> None:
    if (web.cert is None) != (web.key is None):
        raise ConfigError(f"{where}: [web] cert and key go together: set both or neither")
    if not web.listen:
        return
    if not re.fullmatch(_HOSTPORT, web.listen):
        raise ConfigError(f"{where}: [web] listen {web.listen!r} must be HOST:PORT")
    if web.cert is None and not _loopback_host(web.host):
        raise ConfigError(f"{where}: [web] listen {web.listen!r} is not loopback, so the page "
                          "must be HTTPS: set [web] cert and key, or listen on 127.0.0.1 "
                          "behind a reverse proxy that ends TLS (proxy = true)")
    if web.public_url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", web.public_url):
        raise ConfigError(f"{where}: [web] public_url {web.public_url!r} must be a URL like "
                          "https://pbx.example.org/")
    if web.session_minutes < 1 or web.page_size < 1:
        raise ConfigError(f"{where}: [web] session_minutes and page_size must be at least 1")
    if web.support_email:
        try:
            check_email(web.support_email, "[web] support_email")
        except InputError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _validate(s: Settings, where: str) -> None:
    try:
        check_currency(s.billing.currency)
    except InputError as exc:
        raise ConfigError(f"{where}: [billing] currency: {exc}") from None
    try:
        check_plan(s.billing.default_plan, "[billing] default_plan")
    except InputError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not re.match(r"^(rediss?|unix|redis\+sentinel|redis\+cluster)://", s.redis.url):
        raise ConfigError(f"{where}: [redis] url {s.redis.safe_url!r} must start with "
                          "redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://")
    try:
        check_url(s.redis.url)
    except InputError as exc:
        raise ConfigError(f"{where}: [redis] url: {exc}") from None
    _validate_agi(s.agi, where)
    if s.policy.action not in ACTIONS:
        raise ConfigError(f"{where}: [policy] action {s.policy.action!r} must be one of "
                          f"{', '.join(ACTIONS)}")
    if s.payments.gateway not in ("sandbox", "stripe"):
        raise ConfigError(f"{where}: [payments] gateway {s.payments.gateway!r} must be "
                          "\"sandbox\" or \"stripe\"")
    if s.metrics.listen and not re.fullmatch(r"[^:\s]*:[0-9]{1,5}|\[[0-9a-fA-F:]+\]:[0-9]{1,5}",
                                             s.metrics.listen):
        raise ConfigError(f"{where}: [metrics] listen {s.metrics.listen!r} must be HOST:PORT")
    try:
        check_email(s.smtp.sender, "[smtp] from")
    except InputError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if s.policy.dead_letter_after < 1:
        raise ConfigError(f"{where}: [policy] dead_letter_after must be at least 1")
    if s.billing.max_call_seconds < 1:
        raise ConfigError(f"{where}: [billing] max_call_seconds must be at least 1")
    _validate_web(s.web, where)
    _validate_retention(s, where)


def _validate_retention(s: Settings, where: str) -> None:
    if not 8 <= s.ledger.idempotency_days <= 3650:
        raise ConfigError(f"{where}: [ledger] idempotency_days must be 8 to 3650 (a settled "
                          "call's charges may be retried for 7 days), not "
                          f"{s.ledger.idempotency_days}")
    if not 1 <= s.archive.retention_days <= 36500:
        raise ConfigError(f"{where}: [archive] retention_days must be 1 to 36500, not "
                          f"{s.archive.retention_days}")
    if s.archive.format not in ("jsonl", "csv"):
        raise ConfigError(f"{where}: [archive] format {s.archive.format!r} must be "
                          "\"jsonl\" or \"csv\"")


_SECTIONS: dict[str, type[Any]] = {
    "redis": RedisSettings, "billing": BillingSettings, "ami": AmiSettings, "agi": AgiSettings,
    "smtp": SmtpSettings, "policy": PolicySettings, "payments": PaymentsSettings,
    "metrics": MetricsSettings, "web": WebSettings, "ledger": LedgerSettings,
    "archive": ArchiveSettings,
}


def parse(data: Mapping[str, Any], where: str = "<config>",
          env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    for name, table in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{where}: unknown section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
    parts = {name: _section(cls, name, data.get(name, {}), where, env)
             for name, cls in _SECTIONS.items()}
    settings = Settings(source=where, **parts)
    _validate(settings, where)
    return settings


def load(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load the file named, else ``$PREPAID_CONFIG``, else the system path, else defaults."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_CONFIG):
        path = Path(env[ENV_CONFIG])
    if path is None:
        path = next((p for p in DEFAULT_PATHS if p.exists()), None)
        if path is None:
            return parse({}, "<defaults>", env)
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    if mode & stat.S_IWOTH:  # before anything it says is believed
        raise ConfigError(f"{path}: is writable by every user, so anyone on this host can "
                          f"change what it says; run 'chmod o-w {path}'")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if mode & stat.S_IROTH:
        _refuse_exposed_secrets(path, data)
    return parse(data, str(path), env)


def _refuse_exposed_secrets(path: Path, data: Mapping[str, Any]) -> None:
    """A file anyone on the host can read must not hold secrets: checked before its values,
    so no error about a value comes first."""
    found = [f"[{sec}] {key}" for (sec, key) in _ENV
             if isinstance(data.get(sec), dict) and data[sec].get(key) not in (None, "")
             and (key != "url" or url_has_secret(str(data[sec][key])))]
    if found:
        raise ConfigError(
            f"{path}: holds secrets ({', '.join(found)}) but is readable by every user; "
            f"run 'chmod 640 {path}' or move them to the environment "
            f"({', '.join(_ENV[k] for k in _ENV if f'[{k[0]}] {k[1]}' in found)})")
