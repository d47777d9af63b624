"""The one Redis module: the client for every URL the config takes (single Redis, Sentinel,
Cluster), what an outage raises, and the helpers every Redis reader shares.

Every command and script the project sends names keys of one cluster slot (the keys are
named in prepaid/keys.py, the scripts live in prepaid/lua.py), so the same calls work on
all three.
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import DataError, RedisClusterException, RedisError

from prepaid.errors import InputError

# What connect() returns.  Every command and script the project sends names keys of one
# cluster slot, so the same calls work on a single Redis, through Sentinel and on a Cluster.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster
# What a Redis outage raises.  The cluster client also raises RedisClusterException (not a
# RedisError) when no node answers or a slot has no primary, as during a failover.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)

_PASSWORD = re.compile(r"//([^:@/]*):[^@/]*@")


def mask_url(url: str) -> str:
    """``url`` without its password (``redis://user:***@host``): the only form of a Redis
    URL that goes into a message, a log line or ``--json``."""
    return _PASSWORD.sub(r"//\1:***@", url)


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
    """
    if url.startswith("redis+sentinel://"):
        return _sentinel_client(url, timeout)
    if url.startswith("redis+cluster://"):
        return _cluster_client(url, timeout)
    # A burst past the pool size waits for a free connection (up to ``timeout``) instead
    # of failing at once as redis-py's default pool does.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout)
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


def _hosts(url: str, part: str, what: str) -> list[tuple[str, int]]:
    hosts: list[tuple[str, int]] = []
    for item in part.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"{what} address {item!r} in {mask_url(url)!r} must be HOST:PORT")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _cluster_client(url: str, timeout: float) -> RedisCluster:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    rest = url[len("redis+cluster://"):]
    auth, _, rest = rest.rpartition("@")
    hosts_part, _, path = rest.partition("/")
    if not hosts_part or path.strip("0"):
        raise InputError(f"cluster URL {mask_url(url)!r} must be redis+cluster://host:port"
                         "[,host:port...] (a cluster has no database number)")
    user, _, password = auth.partition(":")
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in _hosts(url, hosts_part, "cluster node")],
        username=user or None, password=password or None, socket_timeout=timeout,
        socket_connect_timeout=timeout)
    return client


def _sentinel_client(url: str, timeout: float) -> aioredis.Redis:
    from redis.asyncio.sentinel import Sentinel

    rest = url[len("redis+sentinel://"):]
    auth, _, rest = rest.rpartition("@")
    hosts_part, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    if not hosts_part or not service:
        raise InputError(f"sentinel URL {mask_url(url)!r} must be "
                         "redis+sentinel://host:port/service")
    hosts = _hosts(url, hosts_part, "sentinel")
    password = auth.partition(":")[2] or None
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    sentinel = Sentinel(hosts, sentinel_kwargs=options, **options)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        service, password=password, db=int(db or 0), socket_timeout=timeout,
        socket_connect_timeout=timeout)
    pool = client.connection_pool
    pool.connection_class = _packed(pool.connection_class)
    return client
