"""The one place that reaches into huggingface_hub's private parts, the retry rule for the hub's passing faults,
and the one answer to "is the hub reachable?".

download_models.py resumes a weights file across runs, which the public API does not offer (snapshot_download
deletes its partial file on failure), and it must own its retries: huggingface_hub retries inside `http_get`
(up to 6 attempts, 1 s apart, reset whenever a byte arrives), inside `http_backoff` (used by `list_repo_tree`:
6 attempts with a log warning each) and, for 429, inside the stream it opens. Wrapped in our own tries, those
multiplied to 18 attempts and about 200 s for one stalled file, printing the library's warnings over our output.
So the streaming GET and the tree listing are made here, on the library's shared HTTP client (`get_session`:
the user's proxy and client settings) with one timeout and no retries, and `with_retries` is the only layer that
tries again. What this file relies on that huggingface_hub does not promise to keep: `utils.hf_raise_for_status`
(the hub's error classes from an answer), `utils.build_hf_headers`, `utils.disable_progress_bars`,
`constants.ENDPOINT` / `constants.HF_HUB_OFFLINE` (read once, at import), `get_hf_file_metadata`'s
`retry_on_errors` switch, and the HTTP client's exception classes (`httpx2`). They are named here with the
version they were checked on; tests/test_download.py's contract test fails loudly, naming the missing piece,
when an upgrade moves one. Nothing here imports the project, so anything may import it.

    python -c "import hub; print(hub.CHECKED_ON, hub.missing_private_api(), hub.hub_reachable())"
"""
from __future__ import annotations

import email.utils
import os
import threading
import time

# The versions the private names below were read from (their source, not their docs).
CHECKED_ON = {"huggingface_hub": "2.4.0", "httpx2": "2.16.2"}
RETRY_TRIES = 3  # one first try and two retries: enough for a passing 5xx, short enough to fail in seconds
RETRY_BACKOFF_SEC = 1.0  # 1 s then 2 s when the server does not say how long to wait
RETRY_AFTER_CAP_SEC = 30.0  # a Retry-After longer than this is not "passing": wait no longer, say so, stop later
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
# A connection that sends nothing for this long is stalled. 10 s is huggingface_hub's own default; with three
# tries a stall ends the run in about 35 s (10 + 1 + 10 + 2 + 10).
READ_TIMEOUT_SEC = 10.0
CONNECT_TIMEOUT_SEC = 5.0  # a TCP handshake takes milliseconds; 5 s allows a slow DNS answer
REACHABLE_TIMEOUT_SEC = 2.0  # hub_reachable(): the answer must come before a user notices the wait
REACHABLE_MEMORY_SEC = 30.0  # a chat that loads models one after another asks once per 30 s, not per load
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "ON", "YES", "TRUE")
_reachable_seen: dict[str, tuple[float, bool]] = {}  # endpoint -> (when asked, answer)


def missing_private_api() -> list[str]:
    """The private names this file relies on that the installed libraries no longer have (empty: all present)."""
    import inspect
    missing = []
    try:
        import huggingface_hub
        from huggingface_hub import constants, utils
    except ImportError as error:
        return [f"huggingface_hub ({error})"]
    for module, names in ((constants, ("ENDPOINT", "HF_HUB_OFFLINE")),
                          (utils, ("hf_raise_for_status", "build_hf_headers", "disable_progress_bars")),
                          (huggingface_hub, ("get_session", "get_hf_file_metadata", "hf_hub_url", "HfApi"))):
        missing += [f"{module.__name__}.{name}" for name in names if not hasattr(module, name)]
    if hasattr(huggingface_hub, "get_hf_file_metadata"):
        absent = {"retry_on_errors", "timeout", "endpoint"} - \
            set(inspect.signature(huggingface_hub.get_hf_file_metadata).parameters)
        missing += [f"huggingface_hub.get_hf_file_metadata parameters {sorted(absent)}"] if absent else []
    try:
        import httpx2
        missing += [f"httpx2.{name}" for name in ("RequestError", "TimeoutException", "ReadTimeout", "ReadError",
                                                  "WriteError", "RemoteProtocolError", "Timeout")
                    if not hasattr(httpx2, name)]
    except ImportError:
        missing.append("httpx2 (huggingface_hub's HTTP client)")
    return missing


# ------------------------------------------------------------------------------------------ settings
def endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import), else the library's configured one."""
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT or DEFAULT_ENDPOINT).rstrip("/")


def offline_by_setting() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub froze it at import."""
    if any((os.environ.get(name) or "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    import sys
    constants = sys.modules.get("huggingface_hub.constants")  # imported only if someone already did
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable(timeout_sec: float = REACHABLE_TIMEOUT_SEC) -> bool:
    """Is the configured hub reachable? False at once when offline mode is set; otherwise a TCP connection to the
    endpoint (or to the proxy the environment names for it), answered within timeout_sec and remembered for
    REACHABLE_MEMORY_SEC. A connection, not a request: any hub answers it, and nothing is logged or retried."""
    if offline_by_setting():
        return False
    url = endpoint()
    seen = _reachable_seen.get(url)
    if seen and time.monotonic() - seen[0] < REACHABLE_MEMORY_SEC:
        return seen[1]
    import socket
    import urllib.parse
    import urllib.request
    parts = urllib.parse.urlsplit(url)
    proxy = None if urllib.request.proxy_bypass(parts.hostname or "") else \
        urllib.request.getproxies().get(parts.scheme)
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    target = urllib.parse.urlsplit(proxy) if proxy else parts
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome = []

    def connect():
        try:
            socket.create_connection((target.hostname, port), timeout=timeout_sec).close()
            outcome.append(True)
        except (OSError, UnicodeError):
            outcome.append(False)
    thread = threading.Thread(target=connect, daemon=True)  # a DNS lookup ignores the socket timeout
    thread.start()
    thread.join(timeout_sec)
    answer = bool(outcome and outcome[0])
    _reachable_seen[url] = (time.monotonic(), answer)
    return answer


def quiet_library() -> None:
    """Our own bars and sentences replace the library's tqdm bars."""
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()


def timeout():
    import httpx2
    return httpx2.Timeout(READ_TIMEOUT_SEC, connect=CONNECT_TIMEOUT_SEC)


# ------------------------------------------------------------------------------------------- requests
def request_headers() -> dict:
    """The library's headers (user agent, the user's token)."""
    from huggingface_hub.utils import build_hf_headers
    return build_hf_headers()


def file_metadata(url: str):
    """HEAD on a resolve url (size, etag, where it redirects): one try, our timeout; gated repos fail here."""
    from huggingface_hub import get_hf_file_metadata
    return get_hf_file_metadata(url, endpoint=endpoint(), timeout=READ_TIMEOUT_SEC, retry_on_errors=False)


def list_tree(hub_id: str, revision: str) -> list[dict]:
    """Every file of a repo at `revision` as the hub's tree API lists it ({path, size, oid, lfs?}), following its
    pages; one try per page (HfApi.list_repo_tree retries inside, and without a timeout)."""
    from urllib.parse import quote
    from huggingface_hub import get_session
    from huggingface_hub.utils import hf_raise_for_status
    url = f"{endpoint()}/api/models/{hub_id}/tree/{quote(revision, safe='')}"
    params, entries = {"recursive": True, "expand": False}, []
    while url:
        response = get_session().get(url, params=params, headers=request_headers(), timeout=timeout(),
                                     follow_redirects=True)
        hf_raise_for_status(response)
        entries += [e for e in response.json() if e.get("type") == "file"]
        url, params = response.links.get("next", {}).get("url"), None  # the next link carries the query
    return entries


def stream_get(url: str, file, *, resume_size: int, headers: dict, expected_size: int | None,
               chunk_bytes: int) -> None:
    """GET `url` into `file` from byte `resume_size` on (a Range request), `chunk_bytes` per write: one try, no
    retries (with_retries owns them); a connection silent for READ_TIMEOUT_SEC raises httpx2.ReadTimeout."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import hf_raise_for_status
    headers = {**headers, **({"Range": f"bytes={resume_size}-"} if resume_size else {})}
    received = resume_size
    with get_session().stream("GET", url, headers=headers, timeout=timeout(), follow_redirects=True) as response:
        hf_raise_for_status(response)
        if resume_size and response.status_code == 200:  # the server ignored the Range: start again from byte 0
            file.seek(0)
            file.truncate()
            received = 0
        for chunk in response.iter_bytes(chunk_size=chunk_bytes):
            file.write(chunk)
            received += len(chunk)
    if expected_size is not None and received != expected_size:
        raise OSError(f"the hub sent {received} bytes where {expected_size} were expected")


# ------------------------------------------------------------------------------------- errors, retries
def network_errors() -> tuple[type[Exception], ...]:
    """Connection, timeout, protocol and redirect-loop errors, and the library's refusal in offline mode."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled
    return httpx2.RequestError, OfflineModeIsEnabled


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


def network_problem(error: Exception) -> str:
    """A network error in words: a stall says how long nothing arrived."""
    import httpx2
    if isinstance(error, httpx2.ReadTimeout):
        return f"the hub sent nothing for {READ_TIMEOUT_SEC:.0f} s"
    if isinstance(error, dropped_connection_errors()):
        return f"the connection dropped ({type(error).__name__})"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def transient_reason(error: Exception) -> str | None:
    """Why `error` may pass if we try again (a 5xx, 429, a dropped or stalled connection), or None when not."""
    if isinstance(error, dropped_connection_errors()):
        return network_problem(error)
    code = status_code(error)
    if code in TRANSIENT_STATUSES:
        return f"the hub answered {code}"
    return None


def with_retries(call, *, what: str, log, sleep=time.sleep, progress=None):
    """call() up to RETRY_TRIES times while it fails with a passing fault, waiting Retry-After (capped) or 1 s,
    2 s between tries; the last error propagates with "gave up after N tries" in what log() printed.

    progress(), when given, counts what has been kept so far (bytes on disk): a try that moved it on is not a
    failed one, so a long file survives many dropped connections while a stall still ends after RETRY_TRIES."""
    attempt, kept = 1, progress() if progress else None
    while True:
        try:
            return call()
        except Exception as error:
            reason = transient_reason(error)
            if reason is None:
                raise
            if progress and progress() > kept:
                attempt, kept = 1, progress()
            elif attempt == RETRY_TRIES:
                log(f"{what}: {reason}; gave up after {RETRY_TRIES} tries.")
                raise
            wait = retry_after_sec(error)
            wait = RETRY_BACKOFF_SEC * 2 ** (attempt - 1) if wait is None else wait
            log(f"{what}: {reason}; trying again in {wait:.0f} s ({attempt} of {RETRY_TRIES - 1} retries).")
            sleep(wait)
            attempt += 1
