"""Network addresses: whether a host or URL names this machine only.

Used wherever "loopback only" is a safety rule: ``auth.mode: off`` (every listener must be
loopback), an OIDC issuer over plain http, and the webhook sink's example secret."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is loopback only
    (localhost, 127.0.0.0/8, ::1). ``0.0.0.0``, ``::`` and any other name are not: they can be
    reached from other hosts."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine (its host is loopback, see :func:`is_loopback_host`)."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return is_loopback_host(host)
