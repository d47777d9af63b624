"""The one Redis module: the client for every URL the config takes (single Redis, Sentinel,
Cluster), what an outage raises, and the helpers every Redis reader shares.

Every command and script the project sends names keys of one cluster slot (the keys are
named in prepaid/keys.py, the scripts live in prepaid/lua.py), so the same calls work on
all three.
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias
from urllib.parse import unquote

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.connection import parse_url
from redis.exceptions import DataError, RedisClusterException, RedisError

from prepaid.errors import InputError

# What connect() returns.  Every command and script the project sends names keys of one
# cluster slot, so the same calls work on a single Redis, through Sentinel and on a Cluster.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster
# What a Redis outage raises.  The cluster client also raises RedisClusterException (not a
# RedisError) when no node answers or a slot has no primary, as during a failover.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)

# A query parameter whose name says it holds a secret (``?password=``, ``ssl_password``...).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|auth|key", re.IGNORECASE)


def split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``(head, userinfo, tail)`` of a Redis URL: ``head`` is ``scheme://`` (empty when
    there is none), ``userinfo`` all up to the *last* ``@`` (None without one), so a raw
    ``@``, ``/``, ``:`` or ``?`` in a password stays in it, and ``tail`` the hosts, path
    and query.  A query value with an ``@`` would be taken for userinfo: masked, never
    shown."""
    scheme, sep, rest = url.partition("://")
    head, rest = (scheme + sep, rest) if sep else ("", url)
    userinfo, at, tail = rest.rpartition("@")
    return (head, userinfo, tail) if at else (head, None, rest)


def mask_url(url: str) -> str:
    """``url`` without its secrets: the only form of a Redis URL that goes into a message,
    a log line or ``--json``.

    The userinfo (up to the last ``@``) becomes ``user:***`` or ``***``, the value of each
    query parameter named like a secret (``password``...) ``***``, a fragment ``***``.
    Sentinel and Cluster URLs (``redis+sentinel://:pw@h:p,h:p/service``) have the same
    shape.  A string that is no URL at all is masked the same way: nothing before its last
    ``@`` is shown."""
    head, userinfo, tail = split_userinfo(url)
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}:***" if colon and head else "***"
        head = f"{head}{shown}@"
    tail, hash_, _ = tail.partition("#")
    tail, question, query = tail.partition("?")
    if question:
        params = []
        for param in query.split("&"):
            name, eq, _ = param.partition("=")
            params.append(f"{name}=***" if eq and _SECRET_PARAM.search(unquote(name)) else param)
        tail = f"{tail}?{'&'.join(params)}"
    return f"{head}{tail}{'#***' if hash_ else ''}"


def url_has_secret(url: str) -> bool:
    """The URL holds a password (userinfo or a query parameter): what mask_url hides."""
    return mask_url(url) != url


def text(value: Any) -> str:
    """A Redis reply (bytes: the clients do not decode) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(url: str, timeout: float = 2.0, max_connections: int = 256) -> RedisClient:
    """A client for ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or
    ``redis+cluster://`` URLs.

    Sentinel URLs name the sentinels and the service:
    ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``; the client
    follows the primary across failovers.  Cluster URLs name one or more nodes to discover
    the cluster from: ``redis+cluster://[:password@]host:port[,host:port...]``; the client
    follows slot moves and failovers.  Its commands are those of ``redis.asyncio.Redis``
    for the keys of one slot, so it is typed as that (see docs/design.md, Redis keys).

    The password may be percent-encoded or raw (an ``@`` or ``/`` in it too); a URL that
    cannot be read raises InputError naming it masked.  Nothing is connected yet.
    """
    if url.startswith("redis+sentinel://"):
        return _sentinel_client(url, timeout)
    if url.startswith("redis+cluster://"):
        return _cluster_client(url, timeout)
    plain, auth = _plain(url)
    # A burst past the pool size waits for a free connection (up to ``timeout``) instead
    # of failing at once as redis-py's default pool does.
    pool = aioredis.BlockingConnectionPool.from_url(
        plain, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, **auth)
    pool.connection_class = _packed(pool.connection_class)
    return aioredis.Redis.from_pool(pool)


def _packed(cls: type[Any]) -> type[Any]:
    """``cls`` packing commands with hiredis's C packer: redis-py's asyncio connections pack
    in Python, the larger part of a ledger change's cost in the client (docs/performance.md)."""
    def pack_command(self: Any, *args: Any) -> list[bytes]:
        head = args[0]
        if isinstance(head, str) and " " in head:  # 'SCRIPT LOAD': sent as two arguments
            args = tuple(head.split()) + args[1:]
        elif isinstance(head, bytes) and b" " in head:
            args = tuple(head.split()) + args[1:]
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # as redis-py's own packer says it
            raise DataError(str(exc)) from exc

    return type(f"Packed{cls.__name__}", (cls,), {"pack_command": pack_command})


def check_url(url: str) -> None:
    """Raise InputError (the URL masked) if ``connect`` could not read ``url``."""
    if url.startswith("redis+sentinel://"):
        _sentinel_parts(url)
    elif url.startswith("redis+cluster://"):
        _cluster_parts(url)
    else:
        _plain(url)


def _auth(userinfo: str | None) -> dict[str, str]:
    """username/password of a URL's userinfo, percent-decoded as redis-py does."""
    if not userinfo:
        return {}
    user, colon, password = userinfo.partition(":")
    out = {"username": unquote(user)} if user else {}
    if colon and password:
        out["password"] = unquote(password)
    return out


def _plain(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its userinfo, and the userinfo's username/password: redis-py's own
    parser ends the host at the first ``/``, so a raw ``/`` in a password broke it (and
    its error showed the piece before it)."""
    head, userinfo, tail = split_userinfo(url)
    plain = head + tail
    try:
        parse_url(plain)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # the userinfo is not in what it parsed: nothing secret
        raise InputError(f"Redis URL {mask_url(url)!r} cannot be read: {exc}") from None
    return plain, _auth(userinfo)


def _hosts(url: str, part: str, what: str) -> list[tuple[str, int]]:
    hosts: list[tuple[str, int]] = []
    for item in part.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"{what} address {mask_url(item)!r} in {mask_url(url)!r} must be "
                             "HOST:PORT")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _cluster_parts(url: str) -> tuple[list[tuple[str, int]], dict[str, str]]:
    _, userinfo, rest = split_userinfo(url)
    hosts_part, _, path = rest.partition("/")
    if not hosts_part or path.strip("0"):
        raise InputError(f"cluster URL {mask_url(url)!r} must be redis+cluster://host:port"
                         "[,host:port...] (a cluster has no database number)")
    return _hosts(url, hosts_part, "cluster node"), _auth(userinfo)


def _cluster_client(url: str, timeout: float) -> RedisCluster:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    hosts, auth = _cluster_parts(url)
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in hosts],
        username=auth.get("username"), password=auth.get("password"), socket_timeout=timeout,
        socket_connect_timeout=timeout)
    return client


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    _, userinfo, rest = split_userinfo(url)
    hosts_part, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    if not hosts_part or not service:
        raise InputError(f"sentinel URL {mask_url(url)!r} must be "
                         "redis+sentinel://host:port/service")
    if not db.isdigit() and db:
        raise InputError(f"sentinel URL {mask_url(url)!r}: the database {db!r} must be a "
                         "number")
    return _hosts(url, hosts_part, "sentinel"), service, int(db or 0), _auth(userinfo).get(
        "password")


def _sentinel_client(url: str, timeout: float) -> aioredis.Redis:
    from redis.asyncio.sentinel import Sentinel

    hosts, service, db, password = _sentinel_parts(url)
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    sentinel = Sentinel(hosts, sentinel_kwargs=options, **options)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        service, password=password, db=db, socket_timeout=timeout,
        socket_connect_timeout=timeout)
    pool = client.connection_pool
    pool.connection_class = _packed(pool.connection_class)
    return client
