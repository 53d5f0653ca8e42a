"""The one place that reaches into huggingface_hub's private parts, and the retry rule for the hub's passing faults.

download_models.py resumes a weights file across runs, which the public API does not offer (snapshot_download
deletes its partial file on failure). For that it needs three things huggingface_hub does not promise to keep:
`file_download.http_get` (the streaming GET with `resume_size`), `constants.DOWNLOAD_CHUNK_SIZE` (how much a kill
can lose) and the HTTP client's exception base class (`httpx2.RequestError`, how a dropped connection shows up).
They live here, named, with the version they were checked on; tests/test_download.py's contract test fails loudly,
naming the missing piece, when an upgrade moves one. Nothing here imports the project, so anything may import it.

    python -c "import hub; print(hub.CHECKED_ON, hub.missing_private_api())"
"""
from __future__ import annotations

import email.utils
import time

# The versions the private names below were read from (their source, not their docs).
CHECKED_ON = {"huggingface_hub": "2.4.0", "httpx2": "2.16.2"}
RETRY_TRIES = 3  # one first try and two retries: enough for a passing 5xx, short enough to fail in seconds
RETRY_BACKOFF_SEC = 1.0  # 1 s then 2 s when the server does not say how long to wait
RETRY_AFTER_CAP_SEC = 30.0  # a Retry-After longer than this is not "passing": wait no longer, say so, stop later
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)


def missing_private_api() -> list[str]:
    """The private names this file relies on that the installed libraries no longer have (empty: all present)."""
    import inspect
    missing = []
    try:
        from huggingface_hub import constants, file_download
    except ImportError as error:
        return [f"huggingface_hub ({error})"]
    if not hasattr(constants, "DOWNLOAD_CHUNK_SIZE"):
        missing.append("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE")
    http_get = getattr(file_download, "http_get", None)
    if http_get is None:
        missing.append("huggingface_hub.file_download.http_get")
    else:
        wanted = {"url", "temp_file", "resume_size", "headers", "expected_size", "displayed_filename"}
        absent = wanted - set(inspect.signature(http_get).parameters)
        if absent:
            missing.append(f"huggingface_hub.file_download.http_get parameters {sorted(absent)}")
    try:
        import httpx2
        if not issubclass(getattr(httpx2, "RequestError", type(None)), Exception):
            missing.append("httpx2.RequestError")
    except ImportError:
        missing.append("httpx2 (huggingface_hub's HTTP client)")
    return missing


def set_chunk_bytes(n_bytes: int) -> None:
    """http_get writes what it receives in chunks of this size: the most a kill can lose (library default 10 MiB)."""
    from huggingface_hub import constants
    constants.DOWNLOAD_CHUNK_SIZE = n_bytes


def http_get(url: str, file, *, resume_size: int, headers: dict, expected_size: int | None, label: str) -> None:
    """Stream `url` into `file` from byte `resume_size` on (a Range request); the library resumes a connection
    that drops mid-body by itself, a few times, while bytes keep arriving."""
    from huggingface_hub.file_download import http_get as private_http_get
    private_http_get(url, file, resume_size=resume_size, headers=headers, expected_size=expected_size,
                     displayed_filename=label)


def network_errors() -> tuple[type[Exception], ...]:
    """Connection, timeout, protocol and redirect-loop errors, and the library's refusal in offline mode."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled
    return httpx2.RequestError, OfflineModeIsEnabled


def endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    import os
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def status_code(error: Exception) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def retry_after_sec(error: Exception) -> float | None:
    """The server's Retry-After (seconds or an HTTP date), capped; None when it sent none."""
    value = getattr(getattr(error, "response", None), "headers", {}).get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value.strip() else None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_SEC)


def dropped_connection_errors() -> tuple[type[Exception], ...]:
    """A connection that broke or stalled after it was made. Refused connections and failed name lookups are not
    here: there is no hub at that address (or no network), and waiting would only delay saying so."""
    import httpx2
    return httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError, httpx2.ReadTimeout


def transient_reason(error: Exception) -> str | None:
    """Why `error` may pass if we try again (a 5xx, 429 or a dropped connection), or None when it will not."""
    if isinstance(error, dropped_connection_errors()):
        return f"the connection dropped ({type(error).__name__})"
    code = status_code(error)
    if code in TRANSIENT_STATUSES:
        return f"the hub answered {code}"
    return None


def with_retries(call, *, what: str, log, sleep=time.sleep):
    """call() up to RETRY_TRIES times while it fails with a passing fault, waiting Retry-After (capped) or 1 s,
    2 s between tries; the last error propagates with "after N tries" added to what log() printed."""
    for attempt in range(1, RETRY_TRIES + 1):
        try:
            return call()
        except Exception as error:
            reason = transient_reason(error)
            if reason is None:
                raise
            if attempt == RETRY_TRIES:
                log(f"{what}: {reason}; gave up after {RETRY_TRIES} tries.")
                raise
            wait = retry_after_sec(error)
            wait = RETRY_BACKOFF_SEC * 2 ** (attempt - 1) if wait is None else wait
            log(f"{what}: {reason}; trying again in {wait:.0f} s ({attempt} of {RETRY_TRIES - 1} retries).")
            sleep(wait)
