"""Image sources checked as text before any OS call: what a hostile request puts in an image url (a NUL, a lone
surrogate, a malformed IPv6 host or port, a host IDNA cannot encode, megabytes of '../', a link loop) is a 4xx
with a message, at once, never a 500 or minutes in a worker thread."""

from __future__ import annotations

import asyncio
import time

import pytest

from pyvl.serve.errors import APIError
from pyvl.serve.media import MAX_URL_CHARS, MediaPolicy, read_image_source


def _refusal(url: str, policy: MediaPolicy) -> APIError:
    start = time.perf_counter()
    with pytest.raises(APIError) as info:
        asyncio.run(read_image_source(url, policy, "messages[0].content[1].image_url"))
    assert time.perf_counter() - start < 5  # bounded by the text's length, not by what an OS call makes of it
    assert info.value.param == "messages[0].content[1].image_url"
    return info.value


@pytest.fixture
def policy(tmp_path):
    return MediaPolicy(local_root=tmp_path.resolve())


@pytest.mark.parametrize(
    ("url", "status", "says"),
    [
        ("http://[::1:80/x.png", 400, "malformed (Invalid IPv6 URL)"),
        ("http://host:99999/x.png", 400, "malformed (Port out of range"),
        ("http://ho\0st/x.png", 400, "contains a NUL character"),
        ("/a\0b.png", 400, "contains a NUL character"),
        ("file:///a%00b.png", 400, "image path contains a NUL character"),
        ("/a\ud800.png", 400, "'\\ud800' at 2, which is not a character"),
        ("http://\udfff/x.png", 400, "which is not a character"),
        ("http://" + "a" * 64 + ".com/x.png", 400, "is not a valid host name"),
        ("../" * 2_000_000 + "x.png", 400, f"6000005 characters; at most {MAX_URL_CHARS}"),
        ("gopher://host/x.png", 400, "scheme 'gopher' is not supported"),
    ],
)
def test_urls_and_paths_refused_as_text(policy, url, status, says):
    error = _refusal(url, policy)
    assert error.status == status and says in error.message


def test_paths_an_os_call_cannot_take_are_unreadable_not_errors(policy, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert "link loop" in _refusal(str(tmp_path / "a" / "x.png"), policy).message
    assert _refusal(str(tmp_path / ("x" * 300)), policy).status == 422  # a name longer than NAME_MAX
    assert "Is a directory" in _refusal(str(tmp_path), policy).message
    deep = str(tmp_path) + "/.." * 2000 + str(tmp_path) + "/missing.png"  # within the cap, resolves inside
    assert _refusal(deep, policy).status == 422


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "169.254.169.254", "0.0.0.0"]
)
def test_private_hosts_are_refused_however_they_are_written(policy, host):
    """An IPv4 address written as IPv4-mapped IPv6 is the same host: refused before any connection."""
    error = _refusal(f"http://{host}/x.png", policy)
    assert error.status == 400 and error.code == "url_not_allowed", error.message
