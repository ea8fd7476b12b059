"""The download guard, installed in every Python process img2dataset starts (this folder is put
on PYTHONPATH, so Python imports this module at start-up, spawned workers included).

It is active only when CONDENSE_DOWNLOAD_GUARD holds its settings (JSON), and then, for every
url img2dataset fetches:

- only http and https are fetched: `file://`, `ftp://`, `data:` and any other scheme, first or
  after a redirect, are refused, so no local file can end up in a shard; proxies from the
  environment are not used (through a proxy, the address finally reached could not be checked);
- a connection is made only to addresses that are global unicast (not loopback, private,
  link-local, cloud-metadata, multicast, reserved or unspecified), unless the address is in
  `allow_networks`. The check is done where names are resolved (`socket.getaddrinfo`), so it
  holds after every redirect and against DNS rebinding: the address connected to is the one
  checked;
- a response is read up to `max_bytes` bytes and for at most `max_seconds` seconds.

A refused url fails with a message starting "condense refused:", which condense counts as
`download_refused` (other failures stay `download_failed`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
import urllib.error
import urllib.request

REFUSED = "condense refused:"
_settings = os.environ.get("CONDENSE_DOWNLOAD_GUARD")
INSTALLED = False

if _settings:
    _cfg = json.loads(_settings)
    _allowed = [ipaddress.ip_network(n, strict=False) for n in _cfg.get("allow_networks", [])]
    _max_bytes = int(_cfg["max_bytes"])
    _max_seconds = float(_cfg["max_seconds"])
    _getaddrinfo = socket.getaddrinfo
    _urlopen = urllib.request.urlopen

    def _permitted(address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        if any(ip in network for network in _allowed):
            return True
        return ip.is_global and not ip.is_multicast

    def getaddrinfo(host, *args, **kwargs):
        found = _getaddrinfo(host, *args, **kwargs)
        kept = [entry for entry in found if _permitted(entry[4][0])]
        if not kept:
            raise OSError(f"{REFUSED} {host} resolves only to addresses that are not public")
        return kept

    class _Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not newurl.lower().startswith(("http://", "https://")):
                raise urllib.error.URLError(f"{REFUSED} redirect to {newurl[:200]!r}")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # No proxies: through a proxy the address connected to could not be checked.
    _opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _Redirects)

    def urlopen(url, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, **kwargs):
        full = url.full_url if isinstance(url, urllib.request.Request) else str(url)
        if not full.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"{REFUSED} scheme of {full[:200]!r}")
        start = time.monotonic()
        response = _opener.open(url, data, timeout)
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > _max_bytes:
            response.close()
            raise urllib.error.URLError(f"{REFUSED} response of {length} bytes (max {_max_bytes})")
        raw_read = response.read

        def read(amt=None):
            if amt is not None:
                return raw_read(amt)
            chunks, total = [], 0
            while True:
                if time.monotonic() - start > _max_seconds:
                    raise urllib.error.URLError(f"{REFUSED} response slower than {_max_seconds} s")
                chunk = raw_read(1 << 16)
                if not chunk:
                    return b"".join(chunks)
                total += len(chunk)
                if total > _max_bytes:
                    raise urllib.error.URLError(f"{REFUSED} response over {_max_bytes} bytes")
                chunks.append(chunk)

        response.read = read
        return response

    socket.getaddrinfo = getaddrinfo
    urllib.request.urlopen = urlopen
    INSTALLED = True
