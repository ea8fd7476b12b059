"""The download guard, installed in every Python process img2dataset starts (this folder is put
on PYTHONPATH, so Python imports this module at start-up, spawned workers included).

It is active only when CONDENSE_DOWNLOAD_GUARD holds its settings (JSON), and then, for every
url img2dataset fetches:

- only http and https are fetched: `file://`, `ftp://`, `data:` and any other scheme, first or
  after a redirect, are refused, so no local file can end up in a shard; proxies from the
  environment are not used (through a proxy, the address finally reached could not be checked);
- a connection is made only to addresses that are global unicast (not loopback, private,
  link-local, cloud-metadata, multicast, reserved or unspecified), and for IPv6 also every IPv4
  address it embeds (mapped, NAT64, 6to4, Teredo), unless the address is in `allow_networks`.
  The check is done where names are resolved (`socket.getaddrinfo`), so it holds after every
  redirect and against DNS rebinding: the address connected to is the one checked;
- a request (connecting, redirects, headers and body) lasts at most `max_seconds` seconds: a
  timer shuts its sockets down, so even a server sending a byte every few seconds is cut off;
  a response is read up to `max_bytes` bytes.

A refused url fails with a message starting "condense refused:", which condense counts as
`download_refused` (other failures stay `download_failed`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import urllib.error
import urllib.request

REFUSED = "condense refused:"
_settings = os.environ.get("CONDENSE_DOWNLOAD_GUARD")
INSTALLED = False

# IPv6 prefixes that carry an IPv4 address, which is what such an address really reaches.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible addresses


def embedded_ipv4(ip):
    """The IPv4 addresses an IPv6 address leads to: mapped, NAT64, 6to4, Teredo, compatible."""
    if ip.version == 4:
        return []
    found = []
    if ip.ipv4_mapped:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour:
        found.append(ip.sixtofour)
    if ip.teredo:
        found += list(ip.teredo)
    if any(ip in net for net in _NAT64) or ip in _COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def public(ip) -> bool:
    """Global unicast, and so is every IPv4 address it embeds."""
    if ip.is_multicast or not ip.is_global:
        return False
    return all(public(v4) for v4 in embedded_ipv4(ip))


if _settings:
    import threading

    _cfg = json.loads(_settings)
    _allowed = [ipaddress.ip_network(n, strict=False) for n in _cfg.get("allow_networks", [])]
    _max_bytes = int(_cfg["max_bytes"])
    _max_seconds = float(_cfg["max_seconds"])
    _getaddrinfo = socket.getaddrinfo
    _create_connection = socket.create_connection
    _request = threading.local()  # the sockets of the request this thread is making

    def _permitted(address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in network for network in _allowed):
            return True
        return public(ip)

    def getaddrinfo(host, *args, **kwargs):
        found = _getaddrinfo(host, *args, **kwargs)
        kept = [entry for entry in found if _permitted(entry[4][0])]
        if not kept:
            raise OSError(f"{REFUSED} {host} resolves only to addresses that are not public")
        return kept

    def create_connection(*args, **kwargs):
        sock = _create_connection(*args, **kwargs)
        sockets = getattr(_request, "sockets", None)
        if sockets is not None:  # the deadline of the request shuts it down
            sockets.append(sock)
        return sock

    class _Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not newurl.lower().startswith(("http://", "https://")):
                raise urllib.error.URLError(f"{REFUSED} redirect to {newurl[:200]!r}")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # No proxies: through a proxy the address connected to could not be checked.
    _opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _Redirects)

    class _Deadline:
        """Shuts the request's sockets down `_max_seconds` after it began (connecting,
        redirects, headers and body alike): a blocked read then returns at once."""

        def __init__(self):
            self.sockets, self.expired = [], False
            self.timer = threading.Timer(_max_seconds, self._expire)
            self.timer.daemon = True
            self.timer.start()

        def _expire(self):
            self.expired = True
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        def refused(self) -> urllib.error.URLError:
            return urllib.error.URLError(f"{REFUSED} response slower than {_max_seconds} s")

        def cancel(self):
            self.timer.cancel()

    def urlopen(url, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, **kwargs):
        full = url.full_url if isinstance(url, urllib.request.Request) else str(url)
        if not full.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"{REFUSED} scheme of {full[:200]!r}")
        deadline = _Deadline()
        _request.sockets = deadline.sockets
        try:
            response = _opener.open(url, data, timeout)
        except Exception:
            deadline.cancel()
            if deadline.expired:
                raise deadline.refused() from None
            raise
        finally:
            _request.sockets = None
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > _max_bytes:
            deadline.cancel()
            response.close()
            raise urllib.error.URLError(f"{REFUSED} response of {length} bytes (max {_max_bytes})")
        raw_read1 = response.read1

        def read(amt=None):
            try:
                chunks, total = [], 0
                while amt is None or total < amt:
                    try:
                        chunk = raw_read1(1 << 16 if amt is None else min(1 << 16, amt - total))
                    except OSError:
                        if deadline.expired:
                            raise deadline.refused() from None
                        raise
                    if deadline.expired:
                        raise deadline.refused()
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > _max_bytes:
                        raise urllib.error.URLError(f"{REFUSED} response over {_max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                if amt is None:
                    deadline.cancel()

        response.read = read
        return response

    socket.getaddrinfo = getaddrinfo
    socket.create_connection = create_connection
    urllib.request.urlopen = urlopen
    INSTALLED = True
