"""Listening sockets for the services' ``listen`` settings, bound before a service starts.

``prepaid serve`` binds them in the supervisor, so a restarted service process inherits
the same sockets and connections wait in the kernel's queue meanwhile instead of being
refused. Every address the host name has is bound, as asyncio does.
"""

from __future__ import annotations

import socket

from prepaid.errors import ServeError


def listening(host: str, port: int, *, what: str, backlog: int) -> list[socket.socket]:
    """Non-blocking listening sockets on ``host:port``; ServeError "cannot listen for
    WHAT: REASON" (one line) when the name does not resolve or the port is taken."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen for {what}: {exc.strerror}") from None
    socks: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((i[0], i[4]) for i in infos):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            # SO_REUSEADDR (as asyncio): a restart binds again at once. Never SO_REUSEPORT:
            # a second serve must fail here, not listen beside the first.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise ServeError(f"cannot listen for {what}: "
                         f"{(exc.strerror or str(exc)).lower()}") from None
    return socks
