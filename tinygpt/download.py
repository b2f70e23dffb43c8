"""Verified downloads: a file fetched over HTTP(S) lands whole and checked against its pinned
sha256, or not at all. Network trouble, server errors and short bodies are retried; a wrong
checksum is not. The data builders (datasets.py, corpus.py) both fetch through download()."""
import hashlib
import re
import time
from pathlib import Path

from tinygpt.common import DataError, atomic_write

RETRIES = 3                   # attempts per download
BACKOFF_S = 0.5               # wait 0.5 s, then 1 s, between attempts
TIMEOUT_S = (10, 60)          # (connect, between bytes) seconds


class RetryableError(Exception):
    """A download failed in a way that may go away on the next attempt."""


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_url(source) -> bool:
    return str(source).startswith(("http://", "https://"))


def download(url, dest, sha256=None) -> Path:
    """dest holding the bytes at url; a file that already matches the pinned sha256 is kept."""
    dest = Path(dest)
    if sha256 and dest.is_file() and sha256_of(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, RETRIES + 1):
        try:
            fetch_once(url, dest, sha256)
            return dest
        except RetryableError as e:
            if attempt == RETRIES:
                raise DataError(f"could not download {url} ({e}, {RETRIES} attempts); check the "
                                "network, or pass --source=PATH_OR_URL with a local copy of "
                                f"{dest.name}") from None
            time.sleep(BACKOFF_S * attempt)


def fetch_once(url, dest, sha256):
    """One attempt: stream into a temporary file next to dest, check it, then rename it into place,
    so dest is either the whole verified file or untouched."""
    def write(f):
        digest, size = stream_into(f, url)
        if size == 0:
            raise DataError(f"{url} sent an empty file; nothing was saved. Check the URL or pass "
                            "--source=PATH_OR_URL")
        if sha256 and digest != sha256:
            raise DataError(f"sha256 mismatch for {url}: got {digest}, expected {sha256}; nothing "
                            f"was saved. Pass --source=PATH with an unmodified copy of {dest.name}")
    atomic_write(dest, write)


def stream_into(f, url):
    """(sha256, size) of the body written to f. Network trouble, 5xx and short bodies are
    retryable."""
    # Imported here, not at the top: only a download needs it, and every process would pay for it.
    import requests
    digest, size = hashlib.sha256(), 0
    # identity encoding, so Content-Length counts the bytes we receive and exposes a truncated body
    headers = {"Accept-Encoding": "identity"}
    try:
        with requests.get(url, stream=True, timeout=TIMEOUT_S, headers=headers) as r:
            if r.status_code >= 500 or r.status_code == 429:
                raise RetryableError(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                raise DataError(f"HTTP {r.status_code} for {url}; check the URL or pass "
                                "--source=PATH_OR_URL")
            compressed = "Content-Encoding" in r.headers
            expected = -1 if compressed else int(r.headers.get("Content-Length", -1))
            for chunk in r.iter_content(1 << 16):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except requests.RequestException as e:
        raise RetryableError(short_reason(e)) from None
    if expected >= 0 and size != expected:
        raise RetryableError(f"truncated: got {size} of {expected} bytes")
    return digest.hexdigest(), size


def short_reason(err) -> str:
    """'ConnectionError: [Errno 111] Connection refused' instead of requests' paragraph."""
    import requests
    # urllib3 saw fewer bytes than the server promised
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "truncated: the connection closed before the whole file arrived"
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(err))
    return f"{type(err).__name__}: {errno.group(0)}" if errno else type(err).__name__
