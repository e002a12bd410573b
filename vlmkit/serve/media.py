"""Where a request's images may come from, and fetching them under that policy.

- `data:` URLs (base64) always;
- `http(s)://` only when the server runs with `--allow-media-url`, and never to a loopback, private,
  link-local, multicast or otherwise non-global address: the host name is resolved once, every
  address it resolves to is checked, and the connection goes to the checked address (so a second DNS
  answer cannot swap it); redirects are followed by hand, each hop checked the same way; the body is
  capped in bytes and the whole fetch in seconds;
- a local path or `file://` URL only under `--media-root`: no `..` part, and the path with its
  symlinks resolved must still lie inside the root, checked before the file is opened.

Anything else is refused with a 400 naming the message part. A decoded image is then loaded by
`vlmkit.data.images.load_image` with a pixel cap, so corrupt files and decompression bombs are 400s too.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.errors import VlmkitError
from vlmkit.serve.errors import bad_request

MAX_IMAGE_PIXELS = 25_000_000  # a 5000x5000 photo; larger is refused as a possible decompression bomb
MAX_REDIRECTS = 3
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


@dataclass(frozen=True)
class MediaPolicy:
    allow_urls: bool = False  # --allow-media-url
    root: Path | None = None  # --media-root, resolved
    max_bytes: int = 32 * 2**20  # one image, fetched or read
    timeout_s: float = 10.0  # one URL fetch, redirects included

    @classmethod
    def of(cls, allow_urls: bool, root: str | None, max_bytes: int, timeout_s: float) -> "MediaPolicy":
        return cls(allow_urls, Path(root).expanduser().resolve() if root else None, max_bytes, timeout_s)


def load(url: str, policy: MediaPolicy, where: str) -> Image.Image:
    """The RGB image at `url` (a data: URL, an http(s) URL or a local path), or a 400 naming `where`."""
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        data = _data_url(url, where)
    elif scheme in ("http", "https"):
        data = _download(url, policy, where)
    elif scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_request(f"{where}: a file:// URL must name a local file (file:///path), not host {parts.netloc!r}", code="invalid_image_url")
        data = _local_file(unquote(parts.path), policy, where)
    elif scheme == "":
        data = _local_file(url, policy, where)
    else:
        raise bad_request(
            f"{where}: image URLs with scheme {scheme!r} are not supported; send a data: URL (base64)", code="invalid_image_url"
        )
    try:
        return load_image(data, max_pixels=MAX_IMAGE_PIXELS)
    except VlmkitError as e:
        reason = str(e).removeprefix("<image bytes>: ")
        raise bad_request(f"{where}: {reason}", code="invalid_image") from None


# -- data: URLs -------------------------------------------------------------------------------------
def _data_url(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise bad_request(f"{where}: a data: URL must be base64, as data:image/png;base64,<data>", code="invalid_image_url")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data: URL is not valid base64", code="invalid_image_url") from None


# -- local files ------------------------------------------------------------------------------------
def _local_file(ref: str, policy: MediaPolicy, where: str) -> bytes:
    if policy.root is None:
        raise bad_request(
            f"{where}: local image paths are off on this server; send a data: URL (base64), or start the server "
            "with --media-root DIR to serve files under DIR", code="media_path_disabled",
        )
    path = Path(ref)
    if ".." in path.parts:
        raise bad_request(f"{where}: an image path may not contain '..'", code="invalid_image_path")
    # Resolving follows every symlink, so a link inside the root that points out of it lands outside.
    try:
        resolved = (path if path.is_absolute() else policy.root / path).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise bad_request(f"{where}: the image path cannot be resolved", code="invalid_image_path") from None
    if not resolved.is_relative_to(policy.root):
        raise bad_request(f"{where}: the image path is outside the server's media root", code="invalid_image_path")
    if not resolved.is_file():
        raise bad_request(f"{where}: no image file {ref!r} under the server's media root", code="invalid_image_path")
    with open(resolved, "rb") as f:
        data = f.read(policy.max_bytes + 1)
    if len(data) > policy.max_bytes:
        raise bad_request(f"{where}: the image file is over the server's limit of {_mb(policy.max_bytes)}", code="image_too_large")
    return data


# -- http(s) ----------------------------------------------------------------------------------------
def is_public(address: str) -> bool:
    """True for a globally routable unicast address: not loopback, private, link-local, shared, reserved
    or multicast (an IPv6 address that embeds an IPv4 one is judged by the IPv4 one)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def _public_address(host: str, port: int, where: str) -> str:
    """The address to connect to for `host`: every address it resolves to must be public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise bad_request(f"{where}: cannot resolve the image URL's host {host!r}", code="invalid_image_url") from None
    addresses = [info[4][0] for info in infos]
    if not addresses or not all(is_public(a) for a in addresses):
        raise bad_request(
            f"{where}: the image URL's host {host!r} is a loopback, private or link-local address; "
            "the server fetches images from public addresses only", code="media_url_forbidden",
        )
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to an address already checked, with the URL's host name in `Host`."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = self.pinned = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """The same over TLS: the certificate is checked against the URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.pinned = self._context.wrap_socket(sock, server_hostname=self.host)


def _download(url: str, policy: MediaPolicy, where: str) -> bytes:
    if not policy.allow_urls:
        raise bad_request(
            f"{where}: image URLs are off on this server; send the image inline as a data: URL (base64), or start "
            "the server with --allow-media-url", code="media_url_disabled",
        )
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_request(f"{where}: the image URL (or a redirect) is not an http(s) URL with a host", code="invalid_image_url")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise bad_request(f"{where}: the image URL has an invalid port", code="invalid_image_url") from None
        address = _public_address(parts.hostname, port, where)
        kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
        conn = kind(parts.hostname, address, port, timeout=_left(deadline, policy, where))
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "vlmkit-serve", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise bad_request(f"{where}: fetching the image URL gave HTTP {response.status}", code="image_fetch_failed")
            return _read_capped(response, conn, deadline, policy, where)
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise bad_request(f"{where}: fetching the image URL took over {policy.timeout_s:g} s", code="image_fetch_timeout") from None
            raise bad_request(f"{where}: fetching the image URL failed ({type(e).__name__})", code="image_fetch_failed") from None
        finally:
            conn.close()
    raise bad_request(f"{where}: the image URL redirected more than {MAX_REDIRECTS} times", code="image_fetch_failed")


def _read_capped(response, conn, deadline: float, policy: MediaPolicy, where: str) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise bad_request(f"{where}: the image at the URL is over the server's limit of {_mb(policy.max_bytes)}", code="image_too_large")
    chunks, size = [], 0
    while True:
        conn.pinned.settimeout(_left(deadline, policy, where))  # conn.sock is gone once the response owns it
        chunk = response.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise bad_request(f"{where}: the image at the URL is over the server's limit of {_mb(policy.max_bytes)}", code="image_too_large")
        chunks.append(chunk)


def _left(deadline: float, policy: MediaPolicy, where: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise bad_request(f"{where}: fetching the image URL took over {policy.timeout_s:g} s", code="image_fetch_timeout")
    return left


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"
