"""Whether a URL points at this machine: loopback addresses only (127.0.0.0/8, ::1, localhost).

The arena's simulated campaigns may only ever reach a guard and an upstream on this machine;
its configs refuse any other address with :func:`require_loopback`::

    >>> loopback_host("http://127.0.0.2:8000/v1")
    True
    >>> loopback_host("http://127.0.0.1@example.com/v1")     # the host is example.com
    False
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def loopback_host(url: str) -> bool:
    """True when ``url`` is http(s) and its host is ``localhost`` or a loopback IP literal.

    Other host names are refused even if they resolve to loopback today: what a name resolves to
    can change, and the check must not depend on DNS."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1
    return ip.is_loopback


def require_loopback(url: str, field: str) -> None:
    """ValueError naming ``field`` unless ``url`` points at this machine."""
    if not loopback_host(url):
        raise ValueError(
            f"{field}={url!r}: simulated campaigns only go to a guard and upstream on this machine; give a "
            "loopback URL (http://127.0.0.1:PORT, http://[::1]:PORT or http://localhost:PORT), e.g. "
            "the address `stillhouse serve` prints")
