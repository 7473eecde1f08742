"""Keep webhooks off private networks (SSRF): vet addresses after DNS, then pin them.

The resolver below is what the webhook HTTP client connects through: it resolves the host,
refuses if any address is private, loopback, link-local, multicast, reserved or unspecified
(unless private targets are allowed), and hands aiohttp exactly the addresses it vetted, so
a DNS answer that changes between the check and the connect cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult

from workers.errors import WebhookTargetRefused

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(ip: Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"))
    )


def check_literal(host: str, allow_private: bool) -> None:
    """Refuse an IP-literal host that is not public (aiohttp skips the resolver for them)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return
    if not allow_private and not is_public(ip):
        raise WebhookTargetRefused(
            f"callback address {ip} is private, loopback or link-local "
            "(set BULKHEAD_WEBHOOK_ALLOW_PRIVATE=1 to allow)"
        )


class VettedResolver(AbstractResolver):
    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {host}: {exc}") from exc
        results: list[ResolveResult] = []
        for fam, _type, proto, _canon, sockaddr in infos:
            addr: Any = sockaddr[0]
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
            if not self.allow_private and not is_public(ip):
                raise WebhookTargetRefused(
                    f"callback host {host} resolves to {ip}, a private, loopback or link-local "
                    "address (set BULKHEAD_WEBHOOK_ALLOW_PRIVATE=1 to allow)"
                )
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=port,
                    family=fam,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        if not results:
            raise OSError(f"{host} has no addresses")
        return results

    async def close(self) -> None:
        return None
