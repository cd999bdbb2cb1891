"""The SSRF guard: which URLs the service may connect to on a client's behalf, and how.

Webhook deliveries (:mod:`ham_core.webhooks`) and image fetches by URL
(:mod:`service.api.fetch`) both go through it: an http(s) URL whose host resolves only to
public unicast addresses passes, and the request then connects to the address that was
vetted (:func:`pinned_request`), so a second DNS answer cannot re-point it (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address, or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
        else:
            # 6to4 (2002:7f00:1::) and Teredo addresses carry an IPv4 address a relay may route to.
            embedded = [ip.sixtofour] if ip.sixtofour is not None else list(ip.teredo or ())
            for inner in embedded:
                reason = _refusal(inner)
                if reason is not None:
                    return f"{reason} (embedded IPv4 {inner})"
    for label, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return label
    # Shared address space (100.64/10), documentation ranges and the like: not private, not global.
    return None if ip.is_global else "non-global"


def check_public_url(url: str, allow_private: bool, field: str, setting: str) -> str | None:
    """Raise ``ValueError`` unless ``url`` is an http(s) URL whose host resolves only to public addresses.

    Returns the vetted address to connect to, so that the request cannot be re-pointed by a
    second DNS answer (DNS rebinding). With ``allow_private`` only the scheme and host are
    checked (no DNS lookup) and ``None`` is returned. ``field`` names the URL in messages and
    ``setting`` is the variable that would allow internal targets.
    """
    if any(char.isspace() or not char.isprintable() for char in url):
        # urlsplit keeps them in the host ("exa mple.com"), so without a DNS check nothing else would object.
        raise ValueError(f"{field} must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{field} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{field} must use http or https, got {parts.scheme or 'no scheme'!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"{field} has no host")
    if allow_private:
        return None
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"{field} host {host!r} does not resolve: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        reason = _refusal(address)
        if reason is not None:
            raise ValueError(
                f"{field} host {host!r} resolves to {address}, a {reason} address; "
                f"set {setting}=true to allow internal targets"
            )
    return str(infos[0][4][0]).split("%", 1)[0]


def pinned_request(url: str, address: str | None) -> tuple[str, dict[str, str], dict[str, Any]]:
    """``(url, headers, extensions)`` that reach ``url``'s host at ``address`` exactly.

    The URL's host is replaced by the address; the ``Host`` header and, for https, the TLS
    server name (SNI and certificate check) keep the original name.
    """
    if address is None:
        return url, {}, {}
    parts = urlsplit(url)
    ip = ipaddress.ip_address(address)
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    # An IPv6 literal keeps its brackets in Host (RFC 9110 §7.2 uses the URI's host syntax): "[::1]:8080".
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), {"Host": host_header}, extensions
