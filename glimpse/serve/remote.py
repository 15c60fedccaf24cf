"""Fetching `http(s)` image URLs, only when the server is started with an allowlist of hosts.

A URL is a way to make the server connect somewhere, so every hop (the URL and each redirect) must
name an allowlisted host whose addresses are all public: no private, loopback, link-local,
multicast or reserved address.  The connection goes to the address that was checked (no second DNS
lookup that could answer differently), the body is capped in bytes and the whole fetch in time: one
deadline covers the DNS lookup, connecting, the status line and headers and the body, and when it
passes the socket is shut down, so a host that drips its answer a byte at a time cannot hold a thread.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import quote, urljoin, urlsplit

from glimpse.errors import GlimpseError

_EMBEDS_IPV4 = [ipaddress.ip_network(n) for n in ("::/96", "64:ff9b::/96", "64:ff9b:1::/48")]
# getaddrinfo has no timeout: lookups run here and the caller waits at most until its deadline (a stuck
# lookup keeps one of these threads, never a request's)
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="glimpse-dns")
_URL_PATH_SAFE = "/%:@!$&'()*+,;=-._~"  # RFC 3986 path characters: the rest (non-ASCII too) is percent-encoded


def is_public_address(ip: str) -> bool:
    """A global unicast address; an IPv6 address that carries an IPv4 one (mapped, compatible,
    6to4, Teredo, NAT64) is judged by that IPv4 address too."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if not addr.is_global or addr.is_multicast or addr.is_reserved:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local:  # fec0::/10: deprecated, still private
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        inner = [addr.ipv4_mapped, addr.sixtofour, addr.teredo[1] if addr.teredo else None]
        if any(addr in net for net in _EMBEDS_IPV4):
            inner.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        return all(is_public_address(str(v4)) for v4 in inner if v4 is not None)
    return True


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self):
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.ip = ip

    def connect(self):
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _shut(conn) -> None:
    """End the connection's reads and writes now (close alone does not wake a thread blocked in recv)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class RemoteImageFetcher:
    def __init__(self, allow_hosts, max_bytes: int = 10_000_000, timeout: float = 10.0, max_redirects: int = 3,
                 address_ok=is_public_address):
        self.allow_hosts = {h.strip().lower() for h in allow_hosts if h.strip()}
        self.max_bytes, self.timeout, self.max_redirects = max_bytes, timeout, max_redirects
        self.address_ok = address_ok  # tests swap in a policy; the server always uses is_public_address

    def _address(self, host: str, port: int, deadline: float) -> str:
        lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise GlimpseError("fetching the image URL timed out (resolving its host)") from None
        except (OSError, UnicodeError):
            raise GlimpseError(f"image host {host} cannot be resolved") from None
        ips = sorted({info[4][0] for info in infos})
        if not ips or not all(self.address_ok(ip) for ip in ips):
            raise GlimpseError(f"image host {host} resolves to a non-public address; refused")
        return ips[0]

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        for _ in range(self.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise GlimpseError("only http(s) image URLs can be fetched")
            host = parts.hostname.lower()
            if host not in self.allow_hosts:
                raise GlimpseError(f"image host {host} is not in the server's allowlist")
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise GlimpseError("the image URL has an invalid port") from None
            ip = self._address(host, port, deadline)
            conn_cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
            conn = conn_cls(host, port, ip, timeout=max(0.1, deadline - time.monotonic()))
            # past the deadline the socket is shut down, which ends a read however slowly the host answers
            cutoff = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, args=(conn,))
            cutoff.daemon = True
            cutoff.start()
            try:
                path = quote(parts.path or "/", safe=_URL_PATH_SAFE) + \
                    (f"?{quote(parts.query, safe=_URL_PATH_SAFE + '?')}" if parts.query else "")
                conn.request("GET", path, headers={"User-Agent": "glimpse-image-fetch", "Accept": "image/*"})
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location")
                    if not location:
                        raise GlimpseError("the image URL redirects nowhere")
                    target = urljoin(url, location)
                    if parts.scheme == "https" and urlsplit(target).scheme != "https":
                        raise GlimpseError("the image URL redirects from https to plain http; refused")
                    url = target
                    continue
                if resp.status != 200:
                    raise GlimpseError(f"the image URL answered HTTP {resp.status}")
                return self._read(resp, deadline)
            except (OSError, http.client.HTTPException):
                if time.monotonic() >= deadline:
                    raise GlimpseError("fetching the image URL timed out") from None
                raise GlimpseError("the image URL could not be fetched (connection failed or timed out)") from None
            finally:
                cutoff.cancel()
                conn.close()
        raise GlimpseError(f"the image URL redirects more than {self.max_redirects} times")

    def _read(self, resp, deadline: float) -> bytes:
        length = resp.getheader("Content-Length")
        if length and length.isascii() and length.isdigit() and int(length) > self.max_bytes:
            raise GlimpseError(f"the remote image is over the {self.max_bytes}-byte limit")
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise GlimpseError("fetching the image URL timed out")
            chunk = resp.read1(65536)  # what has arrived, so the deadline is checked between pieces
            if not chunk:
                if time.monotonic() >= deadline:  # the cutoff shut the socket: not the end of the image
                    raise GlimpseError("fetching the image URL timed out")
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_bytes:
                raise GlimpseError(f"the remote image is over the {self.max_bytes}-byte limit")
            chunks.append(chunk)
