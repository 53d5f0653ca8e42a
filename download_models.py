"""Download models from the Hugging Face Hub: resumable across runs, checked against the hub's hashes, safe to run
twice at once (a lock per file), riding out a passing 5xx or dropped connection (3 tries, honouring Retry-After),
and giving up on a stalled one in about 35 s (nothing for 10 s, three times).

    python download_models.py --list                          # every registry model, its role, size and state
    python download_models.py --models tinyllama-1.1b,pythia-1b
    python download_models.py --models smollm2-135m           # the embedded default, offline from the package index
    HF_TOKEN=hf_... python download_models.py --models llama-3.2-1b --targets
    python download_models.py --verify                        # re-hash every model on disk, converted ones too
    BILLION_LLM_MODELS_DIR=/data/models python download_models.py   # or --models-dir /data/models

Why not `snapshot_download`? Measured against huggingface_hub 2.4: it resumes only within one call (from 10 MiB
boundaries), deletes the partial file when a call fails, and checks only the size, so a killed run starts again
from byte 0 and a corrupted file is kept as if it were good. This script uses the library's own pieces
(HfApi.model_info, hf_hub_url, get_hf_file_metadata, its HTTP client and headers; the non-public ones fenced
in hub.py, which also owns the retries) but keeps `<file>.partial` between runs and checks every file: weights
against the hub's LFS sha256, small files against their git blob id. Xet-backed files come through the same
resolve URL (the hub bridges them to plain HTTP with byte ranges), so one resume path and one sha256 check cover
both storage back ends.

Each model lands flat in models/<short name>/, the folder models.load_model reads, with only what loading needs:
one weight format (safetensors preferred), config, tokenizer and generation files. billion_llm_download.json
beside them records the repo, the commit and the verified hashes; results/download-*.json records the run.
Registry models the package index carries (the embedded default) are prepared from there instead, exactly as the
other scripts do on first use. Nothing here imports torch, so the run ends right after its last byte.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import common
import models
import hub
import records

# A download writes what it receives in chunks of this size (huggingface_hub's default is 10 MiB): it is the most a
# kill can lose. 1 MiB keeps that small at the cost of ~100 writes per second at 100 MB/s.
CHUNK_BYTES = 1 << 20
PLAIN_PROGRESS_EVERY_SEC = 10.0  # how often a non-terminal run prints a progress line for a long file
PLAIN_START_LINE_BYTES = 64 << 20  # off a terminal, files this big also get a line when they start
# Weight formats in order of preference, with their shard index; only one format is fetched.
WEIGHT_FORMATS = ((".safetensors", "model.safetensors.index.json"), (".bin", "pytorch_model.bin.index.json"))
WEIGHT_SUFFIXES = tuple(suffix for suffix, _ in WEIGHT_FORMATS)
# Name prefixes of transformers weights: skips e.g. training_args.bin and Mistral's consolidated.safetensors.
WEIGHT_PREFIXES = {".safetensors": ("model",), ".bin": ("pytorch_model",)}
# Duplicate or foreign weight formats that transformers does not need next to the chosen one.
SKIPPED_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".onnx", ".onnx_data", ".gguf", ".h5", ".msgpack", ".ot",
                    ".tflite", ".mlmodel")
SUPPORT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")  # config, tokenizer, generation files
OK_STATUSES = ("downloaded", "up_to_date", "verified", "converted", "unverified")
NOTHING_DONE = ("up_to_date", "verified", "unverified")  # a run of only these fetched nothing: it writes no record


class CorruptFileError(Exception):
    """A file failed its hash check twice (or could not be fetched again): never reported as success."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One model asked for on the command line."""
    name: str  # folder name under the models dir (the registry short name when there is one)
    hub_id: str
    spec: models.ModelSpec | None


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None  # LFS content hash (weights)
    git_oid: str | None  # git blob sha1 (small files kept in git)


@dataclasses.dataclass
class ModelPlan:
    target: Target
    commit: str | None = None
    gated: object = None  # the hub's answer: False, "auto" or "manual"
    files: list[RemoteFile] = dataclasses.field(default_factory=list)
    from_manifest: bool = False  # the hub was unreachable: expected hashes come from our own record


# ------------------------------------------------------------------------------------------ what to fetch
def parse_targets(names_text: str, with_targets: bool) -> list[Target]:
    """Registry short names or hub ids (org/name), plus the speculative targets with --targets."""
    by_hub = {s.hub_id: s for s in models.REGISTRY.values()}
    names = {"all": list(models.REGISTRY), "seeds": models.SEED_MODELS}.get(
        names_text.strip(), [m.strip() for m in names_text.split(",") if m.strip()])
    if not names:
        raise common.UserError("--models is empty: give registry names or hub ids, separated by commas.")
    targets: list[Target] = []
    for name in names:
        if name in models.REGISTRY:
            spec = models.REGISTRY[name]
        elif models.is_hub_id(name):
            spec = by_hub.get(name)
        else:
            raise common.UserError(f"Unknown model '{name}': use one of {', '.join(models.REGISTRY)} "
                                   "or a hub id like org/name.")
        targets.append(Target(spec.name, spec.hub_id, spec) if spec else
                       Target(common.safe_name(name.split("/")[1]), name, None))
        if with_targets and spec and spec.target:
            target_spec = models.REGISTRY[spec.target]
            targets.append(Target(target_spec.name, target_spec.hub_id, target_spec))
    return list(dict.fromkeys(targets))  # keep order, drop repeats


def select_files(entries: list[RemoteFile]) -> list[RemoteFile]:
    """What loading needs: one weight format and the small root files, weights first and config.json last.

    models.resolve_model treats a folder with config.json as a ready model, so config.json is written only
    after every weight file is in place and verified."""
    root = [e for e in entries if "/" not in e.path]  # skips original/, onnx/, ... duplicates
    weights: list[RemoteFile] = []
    index_name = None
    for suffix, index in WEIGHT_FORMATS:
        weights = [e for e in root if e.path.endswith(suffix) and e.path.startswith(WEIGHT_PREFIXES[suffix])]
        if weights:
            index_name = index
            break
    support = [e for e in root if e.path.endswith(SUPPORT_SUFFIXES) and not e.path.endswith(SKIPPED_SUFFIXES)
               and (not e.path.endswith(".index.json") or e.path == index_name)]
    weights.sort(key=lambda e: -(e.size or 0))
    support.sort(key=lambda e: (e.path == "config.json", e.path))
    return weights + support


def weight_bytes(files: list[RemoteFile]) -> int:
    return sum(f.size or 0 for f in files if f.path.endswith(WEIGHT_SUFFIXES))


# ------------------------------------------------------------------------------------------ hub metadata
def plan_model(api, target: Target, revision: str, log=print) -> ModelPlan:
    """Ask the hub which commit `revision` is and what its files and hashes are (one or two API calls)."""
    info = hub.with_retries(lambda: api.model_info(target.hub_id, revision=revision, files_metadata=True,
                                                   timeout=hub.READ_TIMEOUT_SEC),
                            what=f"{target.hub_id} file list", log=log)
    entries = [RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
               for s in info.siblings or []]
    if not entries or any(e.size is None for e in entries):
        # Mirrors and older hub answers omit per-file metadata from model_info; the tree listing always has it.
        tree = hub.with_retries(lambda: hub.list_tree(target.hub_id, info.sha or revision),
                                what=f"{target.hub_id} file tree", log=log)
        entries = [RemoteFile(f["path"], f.get("size"), (f.get("lfs") or {}).get("oid"),
                              None if f.get("lfs") else f.get("oid")) for f in tree]
    files = select_files(entries)
    if not any(f.path == "config.json" for f in files):
        raise common.UserError(f"{target.hub_id} has no config.json at its root, so it is not a transformers model.")
    return ModelPlan(target, commit=info.sha, gated=info.gated, files=files)


def plan_from_manifest(target: Target, folder: Path) -> ModelPlan | None:
    """Expected files and hashes from our own record, for --verify while the hub is unreachable."""
    manifest = read_manifest(folder)
    if not manifest:
        return None
    files = [RemoteFile(path, entry.get("size_bytes"), entry.get("sha256"), entry.get("git_oid"))
             for path, entry in manifest.get("files", {}).items()]
    return ModelPlan(target, commit=manifest.get("revision"), files=files, from_manifest=True)


def describe_hub_error(error: Exception, hub_id: str) -> tuple[str, str]:
    """(status, one sentence) for an error the hub answered with."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    if isinstance(error, GatedRepoError):
        page = f"https://huggingface.co/{hub_id}"
        if getattr(error.response, "status_code", None) == 403:  # a valid token, but no access granted (yet)
            return "gated", (f"{hub_id} is gated and your token has not been granted access: accept its licence at "
                             f"{page} with that account (approval can take a while) or pass another token with "
                             "HF_TOKEN=hf_... or `hf auth login`.")
        return "gated", (f"{hub_id} is gated: accept its licence at {page} with your account, then pass a token "
                         "(HF_TOKEN=hf_... in the environment or `hf auth login`).")
    if isinstance(error, RepositoryNotFoundError):
        return "not_found", (f"{hub_id} was not found on the hub (a typo, or a private repo: pass a token with "
                             "HF_TOKEN or `hf auth login`).")
    if isinstance(error, RevisionNotFoundError):
        return "not_found", f"{hub_id} has no such revision."
    if isinstance(error, RemoteEntryNotFoundError):
        return "failed", f"{hub_id}: a file listed by the hub was not found when fetched ({first_line(error)})."
    if isinstance(error, HfHubHTTPError):
        if hub.transient_reason(error):
            return "failed", (f"{hub_id}: the hub kept failing ({first_line(error)}) after {hub.RETRY_TRIES} tries; "
                              "run again later to resume where it stopped.")
        return "failed", f"{hub_id}: the hub answered with an error ({first_line(error)})."
    return "failed", f"{hub_id}: {first_line(error)}"


def first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# ------------------------------------------------------------------------------------------- local state
def read_manifest(folder: Path) -> dict:
    path = folder / models.DOWNLOAD_MANIFEST
    if not path.exists():
        return {}
    try:
        return common.read_json(path)
    except common.UserError:
        return {}  # a damaged record only means the files get re-hashed


def write_manifest(folder: Path, plan: ModelPlan, verified: dict, complete: bool) -> None:
    """Rewritten after every verified file, so a killed run keeps what it proved."""
    common.write_json_atomic(folder / models.DOWNLOAD_MANIFEST, {
        "tool": "download_models.py", "repo_id": plan.target.hub_id, "revision": plan.commit,
        "endpoint": hub.endpoint(), "complete": complete,
        "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "files": verified})


def git_blob_sha1(path: Path) -> str:
    """The id git gives a file's content: sha1 of 'blob <size>\\0' + bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, remote: RemoteFile) -> tuple[bool, str, str]:
    """(ok, what was checked, the value found). Size first: it is free and catches truncation."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return False, "size", str(size)
    if remote.sha256:
        actual = common.sha256_file(path)
        return actual == remote.sha256, "sha256", actual
    if remote.git_oid:
        actual = git_blob_sha1(path)
        return actual == remote.git_oid, "git_blob_sha1", actual
    return remote.size is not None, "size", str(size)


def is_recorded(path: Path, remote: RemoteFile, manifest: dict) -> bool:
    """Verified by an earlier run and unchanged in size: trusted without re-hashing (unless --verify)."""
    entry = manifest.get("files", {}).get(remote.path)
    return bool(entry and path.exists() and entry.get("size_bytes") == remote.size == path.stat().st_size
                and entry.get("sha256") == remote.sha256 and entry.get("git_oid") == remote.git_oid)


def bytes_still_needed(plan: ModelPlan, folder: Path) -> int:
    manifest = read_manifest(folder)
    needed = 0
    for remote in plan.files:
        final, partial = folder / remote.path, folder / (remote.path + ".partial")
        if final.exists() and (is_recorded(final, remote, manifest) or final.stat().st_size == remote.size):
            continue
        needed += max((remote.size or 0) - (partial.stat().st_size if partial.exists() else 0), 0)
    return needed


def disk_state(folder: Path) -> str:
    """What --list says about a model folder, without hashing anything."""
    manifest = read_manifest(folder)
    if manifest.get("complete"):
        missing = [p for p, e in manifest["files"].items() if not (folder / p).exists()
                   or (folder / p).stat().st_size != e.get("size_bytes")]
        if missing:
            return f"damaged: {len(missing)} file(s) missing or resized"
        return f"downloaded, {len(manifest['files'])} files verified {manifest.get('updated_at', '')[:10]}"
    partials = sorted(folder.glob("*.partial")) if folder.is_dir() else []
    if manifest or partials:
        done = sum(e.get("size_bytes") or 0 for e in manifest.get("files", {}).values())
        return f"partial: {common.human_bytes(done + sum(p.stat().st_size for p in partials))} on disk"
    if (folder / models.CONVERSION_MANIFEST).exists():
        return "converted from GGUF (offline copy)"
    if (folder / "config.json").exists():
        return "present, not from this tool (unverified)"
    return "not downloaded"


def check_disk_space(plans: list[ModelPlan], models_dir: Path) -> int:
    """Refuse before the first byte when the downloads cannot fit."""
    needed = sum(bytes_still_needed(p, models_dir / p.target.name) for p in plans)
    free = shutil.disk_usage(models_dir).free
    if needed > free:
        raise common.UserError(f"The downloads need {common.human_bytes(needed)} but only {common.human_bytes(free)} "
                               f"is free on {models_dir}; free some space or choose another folder with --models-dir.")
    return needed


# -------------------------------------------------------------------------------------------- progress
class Reporter:
    """Per-file and total progress: rich bars on a terminal, a few plain lines otherwise (rich honours NO_COLOR)."""

    def __init__(self, console, total_bytes: int):
        self.console, self.total_bytes = console, total_bytes
        self.live = console.is_terminal
        self.progress = self.file_task = self.total_task = None
        self.label, self.file_size, self.file_done, self.file_fetched, self.total_fetched = "", None, 0, 0, 0
        self.file_start = self.last_print = 0.0

    def __enter__(self):
        if self.live:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
            self.progress.start()
            self.total_task = self.progress.add_task("total", total=self.total_bytes or None)
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def log(self, text: str, style: str | None = None) -> None:
        from rich.text import Text
        self.console.print(Text(text, style=style))

    def start_file(self, label: str, size: int | None, already_bytes: int) -> None:
        self.label, self.file_size, self.file_done, self.file_fetched = label, size, already_bytes, 0
        self.file_start = self.last_print = time.perf_counter()
        if self.live:
            self.file_task = self.progress.add_task(label, total=size, completed=already_bytes)
        elif already_bytes or (size or 0) >= PLAIN_START_LINE_BYTES:
            resumed = f", resuming from {common.human_bytes(already_bytes)} on disk" if already_bytes else ""
            self.log(f"{label}: fetching {common.human_bytes(size)}{resumed}")

    def advance(self, n_bytes: int) -> None:
        self.file_done += n_bytes
        self.file_fetched += n_bytes
        self.total_fetched += n_bytes
        if self.live:
            self.progress.advance(self.file_task, n_bytes)
            self.progress.advance(self.total_task, n_bytes)
        elif time.perf_counter() - self.last_print >= PLAIN_PROGRESS_EVERY_SEC:
            self.last_print = time.perf_counter()
            self.log(f"{self.label}: {common.human_bytes(self.file_done)} of {common.human_bytes(self.file_size)}, "
                     f"{self.rate()}")

    def finish_file(self) -> None:
        if self.live:
            self.progress.remove_task(self.file_task)
        self.log(f"{self.label}: fetched {common.human_bytes(self.file_fetched)} in "
                 f"{time.perf_counter() - self.file_start:.1f} s ({self.rate()}); run total "
                 f"{common.human_bytes(self.total_fetched)} of {common.human_bytes(self.total_bytes)}")

    def rate(self) -> str:
        return f"{common.human_bytes(self.file_fetched / max(time.perf_counter() - self.file_start, 1e-6))}/s"


class ProgressFile:
    """The partial file as http_get sees it: every chunk is flushed (a kill keeps it) and counted."""

    def __init__(self, raw, reporter: Reporter):
        self.raw, self.reporter = raw, reporter

    def write(self, data: bytes) -> int:
        written = self.raw.write(data)
        self.raw.flush()
        self.reporter.advance(len(data))
        return written

    def __getattr__(self, name):  # seek/tell/truncate, used when a server ignores the Range header
        return getattr(self.raw, name)


# -------------------------------------------------------------------------------------------- download
def fetch_file(plan: ModelPlan, remote: RemoteFile, folder: Path, reporter: Reporter) -> dict:
    """Fetch one file into <file>.partial, continuing from its size, check its hash, then rename it in place.

    A hash mismatch is reported and the file fetched again from byte 0, once; a second mismatch raises. A passing
    fault (5xx, dropped connection) on the metadata or the GET is retried, the GET resuming from what arrived."""
    from huggingface_hub import hf_hub_url

    final, partial = folder / remote.path, folder / (remote.path + ".partial")
    url = hf_hub_url(plan.target.hub_id, remote.path, revision=plan.commit, endpoint=hub.endpoint())
    label = f"{plan.target.name}/{remote.path}"
    metadata = hub.with_retries(lambda: hub.file_metadata(url), what=f"{label} (metadata)",
                                log=reporter.log)  # gated repos fail here
    size = remote.size if remote.size is not None else metadata.size
    if not (remote.sha256 or remote.git_oid) and metadata.etag:  # X-Linked-Etag: sha256 for LFS, git oid else
        etag = metadata.etag
        remote = dataclasses.replace(remote, size=size, sha256=etag if len(etag) == 64 else None,
                                     git_oid=etag if len(etag) == 40 else None)
    headers = hub.request_headers()
    headers["Accept-Encoding"] = "identity"  # byte ranges must count stored bytes, not gzip ones
    if urlparse(metadata.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a signed CDN url: the token must not leave the hub

    def on_disk() -> int:
        return partial.stat().st_size if partial.exists() else 0

    def get() -> None:
        start = on_disk()  # a retry resumes from what has arrived
        with open(partial, "ab") as raw:
            hub.stream_get(metadata.location, ProgressFile(raw, reporter), resume_size=start, headers=headers,
                           expected_size=size, chunk_bytes=CHUNK_BYTES)

    record = {"path": remote.path, "size_bytes": size, "fetched_bytes": 0, "resumed_from_bytes": 0,
              "status": "downloaded"}
    for attempt in (1, 2):
        resume = partial.stat().st_size if partial.exists() else 0
        if size is not None and resume > size:
            partial.unlink()
            resume = 0
        if attempt == 1:
            record["resumed_from_bytes"] = resume
        reporter.start_file(label, size, resume)
        try:
            hub.with_retries(get, what=label, log=reporter.log, progress=on_disk)
        finally:  # also on Ctrl-C or a network error: what arrived stays in the partial file
            reporter.finish_file()
        record["fetched_bytes"] += reporter.file_fetched
        ok, checked, actual = check_file(partial, remote)
        if ok:
            os.replace(partial, final)
            return {**record, "verified_by": checked, "sha256": remote.sha256, "git_oid": remote.git_oid}
        expected = {"sha256": remote.sha256, "git_blob_sha1": remote.git_oid}.get(checked) or str(size)
        partial.unlink()  # bad bytes must not be resumed from
        reporter.log(f"{label}: {checked} mismatch (expected {expected[:16]}, got {actual[:16]})"
                     + ("; fetching it again." if attempt == 1 else "."), style="bold red")
        record["status"] = "redownloaded"
    raise CorruptFileError(f"{remote.path} failed its {checked} check twice (expected {expected[:16]}, "
                           f"got {actual[:16]}); the hub or the network is serving bad bytes")


@contextlib.contextmanager
def file_lock(lock_path: Path, on_wait):
    """Hold an exclusive lock on lock_path (released when the process ends, however it ends); on_wait() is called
    once if another process holds it. The lock files live in models/.locks/, so a model folder holds only what
    loading reads; they are never deleted, since unlinking a lock file another process waits on splits the lock."""
    import fcntl
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def settle_file(plan: ModelPlan, remote: RemoteFile, folder: Path, manifest: dict, reporter: Reporter,
                verify: bool) -> dict | None:
    """One file's fate: trusted from our record, re-hashed, or fetched. None: bad or missing, and offline.

    Under a lock per file: a second run of the same model waits for the first to finish the file, then finds it
    on disk and checks its hash instead of appending to the same .partial."""
    final = folder / remote.path
    kept = {"path": remote.path, "size_bytes": remote.size, "fetched_bytes": 0, "resumed_from_bytes": 0}
    if final.exists() and not verify and is_recorded(final, remote, manifest):
        return {**kept, "status": "present"}
    label = f"{plan.target.name}/{remote.path}"
    with file_lock(folder.parent / ".locks" / folder.name / f"{remote.path}.lock",
                   lambda: reporter.log(f"{label}: another download of this file is in progress; waiting for it to "
                                        "finish, then checking its hash.")):
        return settle_locked(plan, remote, folder, kept, reporter)


def settle_locked(plan: ModelPlan, remote: RemoteFile, folder: Path, kept: dict, reporter: Reporter) -> dict | None:
    final = folder / remote.path
    if final.exists():
        ok, checked, actual = check_file(final, remote)
        if ok:
            return {**kept, "status": "verified_on_disk", "verified_by": checked}
        reporter.log(f"{plan.target.name}/{remote.path}: {checked} mismatch on disk (got {actual[:16]})"
                     + ("." if plan.from_manifest else "; fetching it again."), style="bold red")
        if plan.from_manifest:
            return None
        final.unlink()
        return {**fetch_file(plan, remote, folder, reporter), "status": "redownloaded"}
    return None if plan.from_manifest else fetch_file(plan, remote, folder, reporter)


def download_model(plan: ModelPlan, folder: Path, reporter: Reporter, verify: bool) -> dict:
    """Bring one model folder in line with the plan; returns its results entry (hub errors become a status)."""
    target = plan.target
    result = {"name": target.name, "hub_id": target.hub_id, "revision": plan.commit, "folder": str(folder),
              "status": "up_to_date", "message": None, "n_files": len(plan.files),
              "total_bytes": sum(f.size or 0 for f in plan.files), "fetched_bytes": 0, "resumed_bytes": 0,
              "files": []}
    manifest = read_manifest(folder)
    if not manifest and (folder / "config.json").exists():
        result.update(status="skipped", message=f"{folder} already holds a model that download_models.py did not "
                      "fetch (e.g. a GGUF conversion); move it away or use --models-dir.")
        return result
    if manifest.get("revision") not in (None, plan.commit):
        reporter.log(f"{target.name}: the hub moved from {manifest['revision'][:10]} to {(plan.commit or '?')[:10]};"
                     " changed files are fetched again.")
    folder.mkdir(parents=True, exist_ok=True)
    verified = dict(manifest.get("files", {}))
    start = time.perf_counter()
    try:
        bad = []
        for remote in plan.files:
            entry = settle_file(plan, remote, folder, manifest, reporter, verify)
            if entry is None:
                bad.append(remote.path)
                continue
            result["files"].append(entry)
            verified[remote.path] = {"size_bytes": remote.size, "sha256": remote.sha256, "git_oid": remote.git_oid,
                                     "verified_by": entry.get("verified_by")
                                     or verified.get(remote.path, {}).get("verified_by")}
            if not plan.from_manifest:
                write_manifest(folder, plan, verified, complete=False)
        if bad:  # only offline: online, a bad or missing file is fetched again
            raise CorruptFileError(f"{', '.join(bad)} failed verification and the hub is not reachable to fetch "
                                   "them again; run again with network access")
        if not plan.from_manifest:
            write_manifest(folder, plan, verified, complete=True)
        refetched = [f["path"] for f in result["files"] if f["status"] == "redownloaded"]
        fetched_any = refetched or any(f["status"] == "downloaded" for f in result["files"])
        result["status"] = "downloaded" if fetched_any else ("verified" if verify else "up_to_date")
        if refetched:
            result["message"] = f"{target.name}: fetched again after a failed hash check: {', '.join(refetched)}."
    except CorruptFileError as error:
        result.update(status="corrupt", message=f"{target.name}: {error}.")
    except hub.network_errors() as error:
        tries = f" after {hub.RETRY_TRIES} tries" if hub.transient_reason(error) else ""
        result.update(status="failed", message=f"{target.name}: {hub.network_problem(error)}{tries}; run again to "
                      "resume where it stopped.")
    except OSError as error:  # hub HTTP errors are OSErrors too; a full disk or a size mismatch end up here
        status, message = describe_hub_error(error, target.hub_id)
        result.update(status=status, message=message)
    result["fetched_bytes"] = sum(f["fetched_bytes"] for f in result["files"])
    result["resumed_bytes"] = sum(f["resumed_from_bytes"] for f in result["files"])
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # a refused model (gated, say) leaves no empty folder behind
    result["download_sec"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------- output
NARROW_COLUMNS = 100  # below this the --list table keeps only the model and its state


def list_models(targets: list[Target], models_dir: Path, revision: str, console) -> None:
    """The --list table: sizes and gated status from the hub when it answers, else from the registry."""
    from huggingface_hub import HfApi
    from rich import box
    from rich.table import Table

    api = HfApi(endpoint=hub.endpoint())
    offline_reason = "HF_HUB_OFFLINE is set" if hub.offline_by_setting() else None
    table = Table(box=box.SIMPLE_HEAD if console.is_terminal else box.ASCII2)
    # The model name is what the user types next: never cut. A narrow terminal gets the columns that fit it.
    table.add_column("model", no_wrap=True, min_width=max((len(t.name) for t in targets), default=5))
    narrow = console.width < NARROW_COLUMNS
    shown = ("on disk",) if narrow else ("role", "hub id", "gated", "weights", "size from", "on disk")
    for column in shown:
        table.add_column(column, justify="right" if column == "weights" else "left")
    for target in targets:
        spec = target.spec
        size = spec.hub_weight_bytes if spec else None
        gated = ("yes" if spec.gated else "no") if spec else "?"
        source = "registry" if spec else "unknown"
        if offline_reason is None and not (spec and spec.gguf_wheel):  # that one never comes from the hub
            try:
                plan = plan_model(api, target, revision, log=lambda _: None)
                size, source = weight_bytes(plan.files), f"hub @ {(plan.commit or '?')[:10]}"
                gated = f"yes ({plan.gated})" if plan.gated else "no"
            except hub.network_errors() as error:
                offline_reason = f"the hub at {hub.endpoint()} is not reachable ({hub.network_problem(error)})"
            except (OSError, common.UserError) as error:
                source = f"registry (hub: {describe_hub_error(error, target.hub_id)[0]})"
        state = disk_state(models_dir / target.name)
        if state == "not downloaded" and spec:
            state = models.DISK_STATES[models.model_on_disk(target.name, models_dir)[1]]
        cells = {"role": models.role_text(spec) if spec else "-", "hub id": target.hub_id, "gated": gated,
                 "weights": common.human_bytes(size), "size from": source, "on disk": state}
        table.add_row(target.name, *[cells[column] for column in shown])
    console.print(table)
    if narrow:
        console.print(f"(a terminal of {NARROW_COLUMNS}+ columns also shows role, hub id, gated status and size)")
    console.print(f"Model folders: {models_dir}/<model>. 'registry' sizes and gated status are the registry's "
                  "figures, not verified online" + (f" ({offline_reason})." if offline_reason else "."))


def print_summary(results: list[dict], console) -> None:
    from rich import box
    from rich.table import Table
    table = Table(box=box.SIMPLE_HEAD if console.is_terminal else box.ASCII2)
    for column in ("model", "status", "files", "size", "fetched", "resumed from", "folder"):
        table.add_column(column)
    for r in results:
        style = None if r["status"] in OK_STATUSES else "bold red"
        table.add_row(r["name"], r["status"], str(r["n_files"]), common.human_bytes(r["total_bytes"]),
                      common.human_bytes(r["fetched_bytes"]), common.human_bytes(r["resumed_bytes"]), r["folder"],
                      style=style)
    console.print(table)
    for r in results:
        if r["message"]:
            print(("error: " if r["status"] not in OK_STATUSES else "note: ") + r["message"],
                  file=sys.stderr if r["status"] not in OK_STATUSES else sys.stdout)


def is_conversion(folder: Path) -> bool:
    return (folder / models.CONVERSION_MANIFEST).is_file() and not (folder / models.DOWNLOAD_MANIFEST).is_file()


def verify_conversion(target: Target, models_dir: Path) -> dict:
    """--verify for a folder converted from a GGUF: every file against the size and sha256 recorded when it was
    converted (models.conversion_record). Folders converted before that record existed get their headers checked."""
    folder = models_dir / target.name
    result = {**refused_result(target, models_dir, "verified", None), "revision": models.model_revision(folder)}
    again = f"run `python download_models.py --models {target.name}`" if target.spec and target.spec.gguf_file \
        else "load its .gguf file again"
    fix = f"delete {folder} and {again} to convert it again"
    try:
        record = common.read_json(folder / models.CONVERSION_MANIFEST)
        files = record.get("files") if isinstance(record, dict) else None
        models.check_model_folder(folder, fix)
    except common.UserError as error:
        return {**result, "status": "corrupt", "message": f"{target.name}: {error}"}
    if not isinstance(files, dict):
        return {**result, "status": "unverified", "message": f"{target.name}: converted before the sizes and hashes of "
                f"its files were recorded, so only its headers could be checked; {fix} with a record."}
    result.update(n_files=len(files), total_bytes=sum(e.get("size_bytes") or 0 for e in files.values()))
    for name, expected in files.items():
        path = folder / name
        actual = common.sha256_file(path) if path.is_file() else None
        if actual != expected.get("sha256"):
            what = "is missing" if actual is None else \
                f"is not the file converted from {record.get('converted_from')} (its sha256 changed)"
            return {**result, "status": "corrupt", "message": f"{target.name}: {path} {what}; {fix}."}
    return result


def prepare_offline_copy(target: Target, models_dir: Path) -> dict:
    """A registry model the package index carries: fetched and converted the way every other script does on first
    use (models.ensure_offline_model), so models/<name>/ is the same folder whichever script made it."""
    folder = models_dir / target.name
    result = refused_result(target, models_dir, "up_to_date", None)
    if not (folder / "config.json").exists():
        start = time.perf_counter()
        try:
            models.ensure_offline_model(target.name, models_dir)
        except common.UserError as error:
            return {**result, "status": "failed", "message": f"{target.name}: {error}"}
        result.update(status="converted", download_sec=time.perf_counter() - start)
    result.update(revision=models.model_revision(folder), n_files=sum(1 for p in folder.iterdir() if p.is_file()))
    result["total_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return result


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--models", default=argparse.SUPPRESS,
                        help="comma-separated registry names or hub ids (org/name), 'seeds' or 'all' (default: "
                             "'seeds', the four 1B seed models; with --list, every registry model; with --verify, "
                             "every model on disk)")
    parser.add_argument("--targets", action="store_true",
                        help="also fetch the 7-12B speculative-decoding targets of the chosen models")
    parser.add_argument("--list", action="store_true",
                        help="print each model's role, size, gated status and on-disk state; downloads nothing")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash files already on disk (against the hub, or our record when offline) "
                             "and fetch again any that fail; converted models are checked against the hashes "
                             "recorded at conversion. Without --models: every model on disk")
    parser.add_argument("--revision", default="main", type=non_empty, help="branch, tag or commit to fetch")
    common.add_common_flags(parser, "--models-dir", "--results-dir")
    return parser.parse_args(argv)


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


def plan_all(targets: list[Target], *, revision: str, verify: bool, models_dir: Path,
             log=print) -> tuple[list[ModelPlan], list[dict]]:
    """Hub metadata for every model before any download; models the hub refuses become results right away."""
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hub.endpoint())
    plans, refused = [], []
    for target in targets:
        try:
            plans.append(plan_model(api, target, revision, log=log))
        except hub.network_errors() as error:
            if not verify:
                tries = f" after {hub.RETRY_TRIES} tries" if hub.transient_reason(error) else ""
                raise common.UserError(f"Cannot reach the Hugging Face Hub at {hub.endpoint()} "
                                       f"({hub.network_problem(error)})"
                                       f"{tries}; check the network or HF_ENDPOINT (`--list` works offline).") \
                    from None
            print(f"note: the hub at {hub.endpoint()} is not reachable; checking against the hashes recorded at "
                  "download time.")
            return verify_plans_offline(targets, models_dir)
        except (OSError, common.UserError) as error:
            refused.append(refused_result(target, models_dir, *describe_hub_error(error, target.hub_id)))
    return plans, refused


def verify_plans_offline(targets: list[Target], models_dir: Path) -> tuple[list[ModelPlan], list[dict]]:
    plans, missing = [], []
    for target in targets:
        plan = plan_from_manifest(target, models_dir / target.name)
        if plan:
            plans.append(plan)
        else:
            missing.append(refused_result(target, models_dir, "failed", f"{target.name} has not been downloaded "
                                          "by this tool, and the hub is not reachable to fetch it."))
    return plans, missing


def targets_on_disk(models_dir: Path) -> list[Target]:
    """--verify without --models: every model folder that carries our record of where it came from (downloaded
    here, or converted from a GGUF, including models/.converted/ for a .gguf named on a command line)."""
    by_hub = {s.hub_id: s for s in models.REGISTRY.values()}
    targets = []
    for folder in sorted([*models_dir.glob("*/"), *models_dir.glob(".converted/*/")]):
        name = folder.relative_to(models_dir).as_posix()
        if (folder / models.DOWNLOAD_MANIFEST).is_file():
            repo_id = read_manifest(folder).get("repo_id") or ""
            spec = models.REGISTRY.get(name) or by_hub.get(repo_id)
            targets.append(Target(name, repo_id or (spec.hub_id if spec else ""), spec))
        elif (folder / models.CONVERSION_MANIFEST).is_file():
            spec = models.REGISTRY.get(name)
            targets.append(Target(name, spec.hub_id if spec else "", spec))
    if not targets:
        raise common.UserError(f"No model in {models_dir} carries a download or conversion record, so there is "
                               "nothing to verify; fetch models with `python download_models.py` first.")
    return targets


def refused_result(target: Target, models_dir: Path, status: str, message: str | None) -> dict:
    return {"name": target.name, "hub_id": target.hub_id, "revision": None, "folder": str(models_dir / target.name),
            "status": status, "message": message, "n_files": 0, "total_bytes": 0, "fetched_bytes": 0,
            "resumed_bytes": 0, "files": []}


def run(argv=None) -> int:
    args = parse_args(argv)
    console = common.make_console()
    hub.quiet_library()
    if args.verify and not hasattr(args, "models"):
        common.check_writable(args.models_dir, what="models folder")  # a file given as the folder is named as one
        targets = targets_on_disk(args.models_dir)
    else:
        targets = parse_targets(getattr(args, "models", "all" if args.list else "seeds"), args.targets)
    if args.list:
        list_models(targets, args.models_dir, args.revision, console)
        return 0
    common.check_writable(args.models_dir, what="models folder")
    common.check_writable(args.results_dir, what="results folder")
    start = time.perf_counter()
    converted = [t for t in targets if args.verify and is_conversion(args.models_dir / t.name)]
    offline = [t for t in targets if t.spec and t.spec.gguf_wheel and t not in converted]
    online = [t for t in targets if t not in offline and t not in converted]
    plans, results = plan_all(online, revision=args.revision, verify=args.verify, models_dir=args.models_dir)
    needed = check_disk_space([p for p in plans if not p.from_manifest], args.models_dir)
    results += [prepare_offline_copy(t, args.models_dir) for t in offline]
    results += [verify_conversion(t, args.models_dir) for t in converted]
    with Reporter(console, needed) as reporter:
        for plan in plans:
            results.append(download_model(plan, args.models_dir / plan.target.name, reporter, args.verify))
    results.sort(key=lambda r: [t.name for t in targets].index(r["name"]))
    print_summary(results, console)
    n_failed = sum(r["status"] not in OK_STATUSES for r in results)
    if all(r["status"] in NOTHING_DONE for r in results):  # the page counts download records: only real ones
        print("Nothing was fetched or converted, so no download record was written.")
        return 0
    config = {"models": [t.name for t in targets], "targets": args.targets, "verify": args.verify,
              "revision": args.revision, "models_dir": str(args.models_dir), "results_dir": str(args.results_dir),
              "endpoint": hub.endpoint()}
    record = common.result_record("download", config, common.environment("cpu", torch_readings=False),
                                  status="complete" if not n_failed else "failed",
                                  models=[{**r, "folder": records.portable_path(r["folder"])} for r in results],
                                  n_failed=n_failed, fetched_bytes=sum(r["fetched_bytes"] for r in results),
                                  run_sec=time.perf_counter() - start)
    label = common.safe_name("+".join(t.name for t in targets))[:60]
    path = common.write_result(record, args.results_dir, name=f"download-{label}-{common.utc_stamp()}.json")
    print(f"Record written to {path}")
    return 1 if n_failed else 0


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
