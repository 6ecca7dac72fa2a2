"""Image sources of a request -> image bytes: ``data:`` base64 URLs, http(s) URLs, local paths.

What a request may make the server read is bounded here: every source has a size cap; http(s) fetches have a
total timeout and at most ``MAX_REDIRECTS`` redirects, each hop's host resolved and refused when any address is
private, loopback, link-local, multicast, reserved or unspecified (unless ``allow_private_urls``); local paths
are read only inside ``local_root`` after resolving symlinks and ``..``. A URL or path is checked as text
before any OS call sees it (length, NUL bytes, unencodable characters, a host name IDNA cannot encode), so every
step after it is bounded by its length. Decoding happens later, through ``pyvl.load_image``'s checks. Policy
refusals are 400s, sources that cannot be read are 422s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from .errors import APIError, bad_request

__all__ = ["MediaPolicy", "read_image_source", "MAX_REDIRECTS"]

MAX_REDIRECTS = 3
MAX_URL_CHARS = 8192  # an http(s) URL or local path; data: URLs are bounded by the byte cap instead


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int = 20 * 2**20
    fetch_timeout_s: float = 10.0
    allow_private_urls: bool = False
    local_root: Path | None = None  # resolved; None: local paths refused


async def read_image_source(url: str, policy: MediaPolicy, param: str) -> bytes:
    if url.startswith("data:"):
        return _data_url(url, policy, param)
    parts = _split(url, param)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return await _fetch(url, policy, param)
    if scheme == "file" or url.startswith(("/", "./", "../")) or not scheme:
        path = _checked_text(unquote(parts.path), "image path", param) if scheme == "file" else url
        return await asyncio.to_thread(_local_file, path, policy, param)
    raise bad_request(
        f"image url scheme {scheme!r} is not supported; use data:, http(s) or a local path",
        param,
        "unsupported_url",
    )


def _checked_text(text: str, what: str, param: str) -> str:
    """``text`` if an OS call may see it: at most MAX_URL_CHARS, no NUL, encodable as UTF-8 (no lone
    surrogates)."""
    if len(text) > MAX_URL_CHARS:
        raise bad_request(
            f"the {what} is {len(text)} characters; at most {MAX_URL_CHARS}", param, "invalid_url"
        )
    if "\0" in text:
        raise bad_request(f"the {what} contains a NUL character", param, "invalid_url")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(
            f"the {what} contains {text[exc.start]!r} at {exc.start}, which is not a character",
            param,
            "invalid_url",
        ) from None
    return text


def _split(url: str, param: str):
    """``urlsplit`` of a URL that passed ``_checked_text``; a malformed one (an unclosed IPv6 bracket, a bad
    port) is a 400."""
    _checked_text(url, "image url", param)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parses the port: 'host:99999' raises here, not later)
    except ValueError as exc:
        raise bad_request(f"the image url {url[:200]!r} is malformed ({exc})", param, "invalid_url") from None
    return parts


def _data_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(
            "a data: image url must be 'data:<mime>;base64,<payload>'", param, "invalid_data_url"
        )
    # the decoded size: 3 bytes per 4 characters, less the '=' padding (so an image of exactly the cap passes)
    if len(payload) * 3 // 4 - len(payload[-2:]) + len(payload[-2:].rstrip("=")) > policy.max_bytes:
        raise APIError(
            413, f"the data: image is over the {policy.max_bytes} byte limit", param, "image_too_large"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data: image url is not valid base64", param, "invalid_base64") from None


def _local_file(path: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.local_root is None:
        raise bad_request(
            "local image paths are refused: the server was started without --allowed-local-media-path",
            param,
            "local_path_not_allowed",
        )
    try:
        # an absolute path replaces the root; '..' and links resolve (a link loop is an OSError or, before
        # Python 3.13, a RuntimeError)
        resolved = (policy.local_root / path).resolve()
    except (OSError, RuntimeError):
        raise APIError(
            422, "cannot resolve the image path (a link loop?)", param, "image_unreadable"
        ) from None
    if not resolved.is_relative_to(policy.local_root):
        raise bad_request(
            "the image path is outside the allowed local media folder", param, "local_path_not_allowed"
        )
    try:
        if resolved.stat().st_size > policy.max_bytes:
            raise APIError(
                413, f"the image file is over the {policy.max_bytes} byte limit", param, "image_too_large"
            )
        return resolved.read_bytes()
    except OSError as exc:
        raise APIError(
            422,
            f"cannot read the image file ({exc.strerror or type(exc).__name__})",
            param,
            "image_unreadable",
        ) from None


def _refused_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def _check_host(url: str, policy: MediaPolicy, param: str) -> None:
    parts = _split(url, param)  # every hop: a redirect's Location is as untrusted as the request
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise bad_request(
            f"image url {url[:200]!r} is not an http(s) url with a host", param, "unsupported_url"
        )
    try:
        parts.hostname.encode("idna")  # what getaddrinfo and httpx do with it; a 64-byte label fails here
    except UnicodeError:
        raise bad_request(
            f"image url host {parts.hostname[:200]!r} is not a valid host name", param, "invalid_url"
        ) from None
    if policy.allow_private_urls:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, parts.port or 443, type=socket.SOCK_STREAM
        )
    except OSError:
        raise APIError(
            422, f"cannot resolve the image url's host {parts.hostname!r}", param, "image_fetch_failed"
        ) from None
    for info in infos:
        if _refused_address(ipaddress.ip_address(info[4][0].split("%")[0])):
            raise bad_request(
                f"image url host {parts.hostname!r} resolves to a private, loopback or link-local "
                "address; refused (start the server with --allow-private-urls to allow it)",
                param,
                "url_not_allowed",
            )


def _redirect_target(url: str, location: str, param: str) -> str:
    try:
        return urljoin(url, location)
    except ValueError:
        raise APIError(
            422,
            f"the image url redirected to a malformed url {location[:200]!r}",
            param,
            "image_fetch_failed",
        ) from None


async def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    try:
        return await asyncio.wait_for(_fetch_hops(url, policy, param), policy.fetch_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise APIError(
            422,
            f"fetching the image url timed out after {policy.fetch_timeout_s:g} s",
            param,
            "image_fetch_failed",
        ) from None
    except httpx.HTTPError as exc:
        raise APIError(
            422, f"cannot fetch the image url ({type(exc).__name__})", param, "image_fetch_failed"
        ) from None


async def _fetch_hops(url: str, policy: MediaPolicy, param: str) -> bytes:
    # Redirects are followed by hand so that every hop's host is checked before it is contacted. (A host whose
    # DNS answer changes between the check and the connection is a remaining gap; see the README.)
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            await _check_host(url, policy, param)
            async with client.stream("GET", url) as response:
                if response.has_redirect_location:  # (is_redirect is any 3xx: a 304 would be fetched again)
                    url = _redirect_target(url, response.headers["location"], param)
                    continue
                if response.status_code != 200:
                    raise APIError(
                        422,
                        f"the image url answered HTTP {response.status_code}",
                        param,
                        "image_fetch_failed",
                    )
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise APIError(
                            413,
                            f"the image at the url is over the {policy.max_bytes} byte limit",
                            param,
                            "image_too_large",
                        )
                return bytes(data)
    raise APIError(
        422, f"the image url redirected more than {MAX_REDIRECTS} times", param, "image_fetch_failed"
    )
