"""Shared pieces of the billion-llm scripts that are not about one model: paths and errors, statistics, memory
and environment readings, the one atomic JSON writer (records are validated by records.py first), the
command-line vocabulary every script speaks, and the terminal. Models (registry, loading, decoding) live in
models.py, which imports this.

Only what two or more scripts need lives here; each script stays readable on its own. Heavy imports
(torch, transformers) happen inside functions so that every script's `--help` is instant.

    python -c "import common; print(common.wilson_interval(7, 20))"
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import records  # the record schema: standard library only, imports nothing of ours

REPO_DIR = Path(__file__).resolve().parent
MODELS_DIR = Path(os.environ.get("BILLION_LLM_MODELS_DIR", REPO_DIR / "models"))
RESULTS_DIR = Path(os.environ.get("BILLION_LLM_RESULTS_DIR", REPO_DIR / "results"))
GIB = 1024**3


class UserError(Exception):
    """An expected failure (bad name, missing file, too little memory...): printed as one sentence, exit 2."""



def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()



# --------------------------------------------------------------------------------------------- measuring
Z_95 = 1.959963984540054  # two-sided 95% normal quantile
CHANCE_ACCURACY = 0.25  # MMLU: four answer choices
# Speculative methods in the order every table shows them: the baselines, then ours.
METHOD_ORDER = ("target_only", "target_generate", "assisted", "ours", "ours_adaptive")


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def paired_ratios(values: dict, baselines: dict) -> dict:
    """Speed-up of paired runs: each value over its baseline from the same (prompt, round) key (the load of a
    shared machine drifts between rounds, far less within one), the median over rounds per prompt, then the
    geometric mean over prompts. {"by_prompt": [...], "geomean": float}."""
    import statistics
    prompts = sorted({prompt for prompt, _ in values})
    by_prompt = [statistics.median(values[p, r] / baselines[p, r] for q, r in values if q == p and (p, r) in baselines)
                 for p in prompts]
    return {"by_prompt": by_prompt, "geomean": geometric_mean(by_prompt)}


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample (n-1) standard deviation, as lm-eval's `acc_stderr`."""
    if len(values) < 2:
        return float("nan")
    return statistics.stdev(values) / math.sqrt(len(values))


def wilson_interval(n_correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: stays inside [0, 1] and is honest at small n."""
    if n == 0:
        return float("nan"), float("nan")
    p = n_correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if n_correct == 0 else max(0.0, center - half)  # exact ends: no 1e-17 rounding dust
    high = 1.0 if n_correct == n else min(1.0, center + half)
    return low, high


def accuracy_block(n_correct: int, n: int) -> dict:
    """Accuracy with lm-eval's stderr and a Wilson 95% interval."""
    accuracy = n_correct / n if n else float("nan")
    stderr = math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else float("nan")
    low, high = wilson_interval(n_correct, n)
    return {"n": n, "n_correct": n_correct, "accuracy": accuracy, "stderr": stderr, "ci95_low": low, "ci95_high": high}


def macro_block(blocks: list[dict]) -> dict:
    """Unweighted mean over subjects; its stderr combines theirs (independent samples), normal 95% interval."""
    accuracies = [b["accuracy"] for b in blocks]
    accuracy = statistics.fmean(accuracies) if accuracies else float("nan")
    stderr = math.sqrt(sum(b["stderr"] ** 2 for b in blocks)) / len(blocks) if blocks else float("nan")
    return {"n_subjects": len(blocks), "accuracy": accuracy, "stderr": stderr,
            "ci95_low": accuracy - Z_95 * stderr, "ci95_high": accuracy + Z_95 * stderr}


def mean_stddev(samples: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; one sample has no spread to measure: nan (null in a record), never a
    0.0 that would read as "no noise"."""
    if not samples:
        return float("nan"), float("nan")
    return statistics.fmean(samples), statistics.stdev(samples) if len(samples) > 1 else float("nan")


def plus_minus(mean: float, spread: float | None, digits: int = 1) -> str:
    """'12.3 +- 0.4', or '12.3' alone when there is no spread to show (a single sample)."""
    if spread is None or not math.isfinite(spread):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {spread:.{digits}f}"


def sync(device: str) -> None:
    """Wait for queued GPU work so a clock reads the real time."""
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def nvml_used_bytes() -> int | None:
    with contextlib.suppress(Exception):
        import pynvml  # from nvidia-ml-py
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    return None


def memory_reading(device: str, peak: bool = False) -> tuple:
    """(bytes, kind) in use now, or with peak the most so far: the CUDA allocator's on a GPU ("vram_allocated"),
    else the process RSS ("rss"). The one reading of memory; MemoryMonitor samples it over a block."""
    if device.startswith("cuda"):
        import torch
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()), "vram_allocated"
    import resource
    rss = this_process().memory_info().rss
    if not peak:
        return rss, "rss"
    most = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    return max(most, rss), "rss"  # the kernel's high-water mark lags the live count by a few pages


@functools.cache
def this_process():
    """psutil's handle on this process, made once: MemoryMonitor reads it every 10 ms."""
    import psutil
    return psutil.Process()


class MemoryMonitor:
    """Peak memory over a block: RSS sampled every 10 ms (psutil), CUDA allocator peaks, NVML device use.

        with MemoryMonitor("cuda") as mem: ...
        mem.result()  # {"peak_rss_bytes": ..., "peak_vram_allocated_bytes": ..., ...}
    """

    def __init__(self, device: str = "cpu", interval_sec: float = 0.01):
        self.device, self.interval_sec = device, interval_sec
        self.peak_rss_bytes = memory_reading("cpu")[0]
        self.peak_nvml_bytes = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_sec)

    def sample(self):
        self.peak_rss_bytes = max(self.peak_rss_bytes, memory_reading("cpu")[0])
        if self.device.startswith("cuda"):
            used = nvml_used_bytes()
            if used is not None:
                self.peak_nvml_bytes = max(self.peak_nvml_bytes or 0, used)

    def __enter__(self):
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def result(self) -> dict:
        out = {"peak_rss_bytes": self.peak_rss_bytes, "peak_vram_allocated_bytes": None,
               "peak_vram_reserved_bytes": None, "peak_vram_nvml_bytes": self.peak_nvml_bytes}
        if self.device.startswith("cuda"):
            import torch
            out["peak_vram_allocated_bytes"] = memory_reading(self.device, peak=True)[0]
            out["peak_vram_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str = "cpu", *, torch_readings: bool = True) -> dict:
    """Library versions and hardware: the provenance block of every results record. torch_readings=False leaves out
    what needs torch imported (its threads, the GPU): a download record must not wait ~12 s for that import."""
    from importlib import metadata
    import psutil
    versions = {}
    for package in ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "huggingface_hub",
                    "httpx2", "datasets", "gguf", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    gpu, torch_threads, capability = None, None, None
    if torch_readings:
        import torch
        torch_threads = torch.get_num_threads()
        # The vector instructions torch's CPU kernels use (AVX2, AVX512...): two CPUs of one name can differ, and
        # bf16 is several times slower than fp32 without AVX512-BF16.
        with contextlib.suppress(AttributeError, RuntimeError):
            capability = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu = {"name": props.name, "total_memory_bytes": props.total_memory,
                   "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
            "n_cpu": os.cpu_count(), "cpu_capability": capability, "torch_threads": torch_threads,
            "ram_total_bytes": psutil.virtual_memory().total, "device": device, "gpu": gpu,
            "versions": versions, "git_commit": commit}


def set_seed(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- results
def umask_file_mode() -> int:
    """The mode a plain open() gives a new file under this process's umask (0o644 under 022): what a file we
    write must have, so that a models folder can be shared with the users the umask lets in."""
    mask = os.umask(0o022)
    os.umask(mask)  # there is no way to read the umask without setting it
    return 0o666 & ~mask


def honour_umask(path: Path) -> None:
    """chmod a file, or every file under a folder, to umask_file_mode(). For writers that ignore the umask:
    safetensors writes through a 0600 temp file, and so does anything built on tempfile.mkstemp."""
    mode = umask_file_mode()
    path = Path(path)
    for file in (path.rglob("*") if path.is_dir() else [path]):
        if file.is_file() and not file.is_symlink():
            file.chmod(mode)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write to a temp file in the same folder, then rename: readers never see a half-written file. The temp file
    is made by open(), so the result has the umask's mode (never tempfile.mkstemp's 0600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as error:
        raise UserError(f"Could not write {path.name} into {path.parent} ({folder_problem(error)}).") from None
    finally:
        with contextlib.suppress(OSError):  # a read-only folder: there is no temp file to remove
            tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: Path, data) -> Path:
    """JSON (non-finite numbers as null), written atomically; a value that cannot be serialized writes nothing."""
    return write_text_atomic(path, json.dumps(records.finite(data), indent=1, allow_nan=False) + "\n")


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def result_record(kind: str, config: dict, environment_block: dict, **fields) -> dict:
    """The common envelope of every results/*.json, at its kind's current version (records.SCHEMAS). The
    config's paths (results_dir, models_dir, ...) are stored portable (records.portable_path)."""
    config = {k: records.portable_path(v) if k in records.PATH_KEYS and isinstance(v, (str, Path)) else v
              for k, v in config.items()}
    return {"schema_version": records.VERSIONS.get(kind), "kind": kind,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "status": fields.pop("status", "complete"), "config": config, "environment": environment_block,
            **fields}


def write_result(record: dict, results_dir: Path | None = None, name: str | None = None) -> Path:
    """results/<kind>-<label>-<stamp>.json, atomically, after records.validate (a record that breaks its kind's
    schema raises ValueError before any file exists). Returns the path."""
    record = records.validate(record)
    results_dir = Path(results_dir or RESULTS_DIR)
    if name is None:
        label = record.get("model", {}).get("name", "run") if isinstance(record.get("model"), dict) else "run"
        name = f"{record['kind']}-{safe_name(label)}-{utc_stamp()}.json"
    return write_json_atomic(results_dir / name, record)


def migrate_results(folder) -> list[Path]:
    """Rewrite every older record in `folder` in its kind's current shape (records.upgrade), atomically; returns the
    files rewritten. The one-off for committed results, and for a user's own; a record that does not load is left."""
    rewritten = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):  # not a record: the page names it, this leaves it
            continue
        if records.load(data)[1] is None and records.upgrade(data) is not data:
            write_json_atomic(path, records.upgrade(data))
            rewritten.append(path)
    return rewritten


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "-" for c in text).strip("-") or "x"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise UserError(missing_path_sentence(Path(path), "file")) from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({json_error_text(error)}).") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}).") from None


def json_error_text(error: json.JSONDecodeError) -> str:
    """'unterminated string starting at line 1 column 7': some of json's messages end in "at" already
    ("Invalid control character at"), so "{msg} at line" would read "at at line"."""
    return f"{error.msg.removesuffix(' at')} at line {error.lineno} column {error.colno}"


def missing_path_sentence(path: Path, kind: str, name: str | None = None) -> str:
    """Why `path` (a "file" or a "folder"; `name` says which, e.g. "GGUF file") cannot be used: it does not exist,
    or a file stands where a folder is expected (the path itself, or one of the folders above it)."""
    above = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    if above is not None:
        return f"{above} is a file, not a folder, so {path} cannot exist; check the path."
    if kind == "folder" and path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder; pass a folder."
    if kind == "file" and path.is_dir():
        return f"{path} is a folder, not a file; pass a file."
    return f"{name or kind.capitalize()} {path} does not exist."


# ------------------------------------------------------------------------------------------------- CLI
def run_cli(run, argv=None) -> int:
    """Every script's `main(argv)`: call its `run(argv)`; expected failures become one sentence on stderr and exit
    code 2, Ctrl-C exit code 130."""
    try:
        return run(argv) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return 130


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def folder_problem(error: OSError) -> str:
    """What an OSError on a folder means, in words."""
    import errno
    return {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a path component is a file, not a folder",
            errno.EEXIST: "a file of that name is in the way"}.get(error.errno, error.strerror or str(error))


def check_writable(folder: Path, *, need_bytes: int = 0, what: str = "output folder") -> Path:
    """Refuse, before any model loads, an output folder that cannot be created or written or that lacks room: a
    run must not work for minutes and then lose its record. Creates the folder."""
    import shutil
    import tempfile
    folder = Path(folder).expanduser()
    try:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"The {what} {folder} is a file, not a folder; pass another path.")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as probe:
            probe.write(b"x" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise UserError(f"The {what} {folder} cannot be written ({folder_problem(error)}); "
                        "pass a writable folder.") from None
    # A record and its samples log are well under 1 MiB; a nearly full disk still fails there.
    need = max(need_bytes, 1 << 20)
    if free < need:
        raise UserError(f"The {what} {folder} has {human_bytes(free)} free but this run needs about "
                        f"{human_bytes(need)}; free some space or pass another folder.")
    return folder


# ---------------------------------------------------------------------------------- command-line vocabulary
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
# auto: 4-bit on a CUDA GPU (a 1B model then leaves room for activations and a second model), none elsewhere
# (bitsandbytes' CPU kernels are slower than bf16); resolved by models.load_model once the device is known.
QUANTIZE_CHOICES = ("auto", "none", "8bit", "4bit")


def _number_type(convert, name: str, ok, rule: str):
    def parse(text: str):
        import argparse
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {name}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"'{text}' must be {rule}")
        return value
    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number_type(int, "a whole number", lambda v: v > 0, "at least 1")
non_negative_int = _number_type(int, "a whole number", lambda v: v >= 0, "0 or more")
positive_float = _number_type(float, "a number", lambda v: math.isfinite(v) and v > 0, "a number above 0")
non_negative_float = _number_type(float, "a number", lambda v: math.isfinite(v) and v >= 0, "0 or more")
probability = _number_type(float, "a number", lambda v: 0 <= v <= 1, "between 0 and 1")
# numpy's and torch's seeds are unsigned 32-bit: a larger or negative one fails only after the model loads.
seed_int = _number_type(int, "a whole number", lambda v: 0 <= v < 2**32, "from 0 to 4294967295")


def comma_list(allowed: tuple | None = None, what: str = "value", listed_by: str = ""):
    """argparse type for "a,b,c": a non-empty list, each item among `allowed` when given. A long `allowed` is not
    printed whole: the error offers the closest names and `listed_by`, a command that lists them all."""
    import argparse

    def parse(text: str) -> str:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"'{text}' names no {what}")
        bad = [item for item in items if allowed and item not in allowed]
        if bad and len(allowed) > 12:
            import difflib
            close = difflib.get_close_matches(bad[0], allowed, n=3)
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}" + (
                f"; did you mean {' or '.join(close)}?" if close else "") + (f" ({listed_by})" if listed_by else ""))
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; use {', '.join(allowed)}")
        return ",".join(items)
    parse.__name__ = f"comma-separated {what}s"
    parse.allowed = allowed  # for docs/flags.py's table
    return parse


def one_of(allowed: tuple, what: str):
    """argparse type for one value among `allowed`, refused in the same words as comma_list's."""
    import argparse

    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {what} '{text}'; use {', '.join(allowed)}")
        return text
    parse.__name__ = what
    return parse


def device_name(text: str) -> str:
    """argparse type for --device: auto, cpu, mps, cuda or cuda:N."""
    import argparse
    if text in DEVICE_CHOICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown device '{text}'; use auto, cpu, cuda, cuda:N or mps")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity: a container or taskset may allow fewer than exist)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(text: str) -> int:
    """argparse type for --threads: 0 or more; above the usable cores is allowed but warned about, once per run
    (the environment variable carries "said" into the child processes of a multi-model run)."""
    value = non_negative_int(text)
    cores = usable_cores()
    if value > cores and not os.environ.get("BILLION_LLM_THREADS_WARNED"):
        os.environ["BILLION_LLM_THREADS_WARNED"] = "1"
        print(f"warning: --threads {value} is more than the {cores} CPU core(s) here; the extra threads wait for "
              "each other at every step, which can make the run several times slower.", file=sys.stderr)
    return value


thread_count.__name__ = "a whole number"

# The flags every script spells the same way: one type (so one set of accepted values), one meaning, one help
# text. A script may choose another default (the formatter shows it); it may not change what the flag means.
COMMON_FLAGS = {
    "--device": {"type": device_name, "default": "auto", "metavar": "{auto,cpu,cuda,cuda:N,mps}",
                 "help": "where models run: auto = a CUDA GPU, else Apple mps, else the CPU"},
    "--dtype": {"type": one_of(DTYPE_CHOICES, "dtype"), "default": "auto",
                "metavar": "{" + ",".join(DTYPE_CHOICES) + "}",
                "help": "weights and compute dtype: auto = bfloat16 where the device supports it, else float16 "
                        "on a GPU"},
    "--quantize": {"type": one_of(QUANTIZE_CHOICES, "quantization"), "default": "none",
                   "metavar": "{" + ",".join(QUANTIZE_CHOICES) + "}",
                   "help": "bitsandbytes weights: auto = 4bit on a CUDA GPU, none elsewhere"},
    "--seed": {"type": seed_int, "default": 1234,
               "help": "random seed of everything sampled or shuffled (question subsets, sampling): the same seed "
                       "repeats a run"},
    "--threads": {"type": thread_count, "default": 0,
                  "help": "torch CPU threads; 0 = automatic: the physical cores other processes leave idle (on a "
                          "busy machine 1 thread can be several times faster than 2)"},
    "--models-dir": {"type": Path, "default": MODELS_DIR,
                     "help": "where downloaded and converted models live (env BILLION_LLM_MODELS_DIR)"},
    "--results-dir": {"type": Path, "default": RESULTS_DIR,
                      "help": "where the JSON records of runs are written and read (env BILLION_LLM_RESULTS_DIR)"},
    "--docs-dir": {"type": Path, "default": None,
                   "help": "where the comparison page (COMPARISON.md and figures/) is written; when not given, "
                           "docs/ beside the results folder (the repository's docs/ for the default results/), so "
                           "a scratch results folder never overwrites the published page"},
}


def page_folder(docs_dir: Path | None, results_dir: Path) -> Path:
    """The folder --docs-dir names, or its default: docs/ beside the results folder. benchmark.py --quick checks
    and docs/generate.py writes this same folder."""
    return Path(docs_dir).expanduser() if docs_dir else Path(results_dir).expanduser().resolve().parent / "docs"


def add_common_flags(parser, *flags: str, defaults: dict | None = None, many: tuple = ()) -> None:
    """Add the named COMMON_FLAGS (e.g. "--device", "--seed") to a parser. defaults: this script's own default for
    some of them; many: flags that take a comma-separated list of their values (one run each)."""
    defaults = defaults or {}
    for flag in flags:
        spec = dict(COMMON_FLAGS[flag])
        if flag in defaults:
            spec["default"] = defaults[flag]
        if flag in many:
            choices = spec.pop("metavar").strip("{}").split(",")
            spec["type"] = comma_list(tuple(choices), spec["type"].__name__)
            spec["help"] = "comma-separated, one run each; " + spec["help"]
        parser.add_argument(flag, **spec)


def argument_parser(doc: str):
    """The one parser shape: the module docstring's first paragraph as description, the rest (example commands)
    as the epilog, kept as written, and every flag's default shown in --help."""
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # no "(default: None)" or "(default: False)": they say nothing
            if action.default is None or action.default is False or "default:" in (action.help or ""):
                return action.help
            return super()._get_help_string(action)

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not the whole usage block: the mistake is what the user must see
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    description, _, epilog = (doc or "").strip().partition("\n\n")
    return Parser(description=description, epilog=epilog or None, formatter_class=Formatter)


def deprecated_alias(parser, old: str, new: str) -> None:
    """Keep a renamed flag working for one release, with a one-line note on stderr each time it is used."""
    import argparse
    target = parser._option_string_actions[new]  # argparse keeps no public map from option to action

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"note: {old} is deprecated and will be removed in the next release; use {new}.",
                  file=sys.stderr)
            setattr(namespace, target.dest, values)

    parser.add_argument(old, dest=target.dest, type=target.type, choices=target.choices, action=Alias,
                        help=argparse.SUPPRESS)


class CpuThreads:
    """Torch CPU threads: `--threads N` fixes N; 0 means the physical cores other processes leave idle, decided
    now and (for long jobs that call update()) re-decided as the machine's load changes.

    On a quiet machine torch's default (one thread per physical core) is fastest. When another process keeps a
    core busy, torch's OpenMP threads wait for each other at every op while one of them is descheduled: on this
    project's shared 2-core machine LoRA steps went from ~0.5 s to 2-70 s, and a chat reply was 6x slower with
    two threads than with one. A single thread has nobody to wait for."""

    def __init__(self, fixed: int = 0, enabled: bool = True):
        import psutil
        import torch
        self.torch, self.psutil = torch, psutil
        self.enabled = enabled and not fixed
        self.physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        self.n_cpu = os.cpu_count() or 1
        self.process = psutil.Process()
        self.changes = []  # [step (-1: evaluation), threads] whenever the count changes
        if fixed:
            torch.set_num_threads(fixed)
        elif self.enabled:
            psutil.cpu_percent(None), self.process.cpu_percent(None)
            time.sleep(0.3)  # a first sample of what the rest of the machine is doing
            self.update(step=0)

    def others_busy_cores(self) -> float:
        """Cores used by other processes since the last call (system use minus ours)."""
        system = self.psutil.cpu_percent(None) / 100 * self.n_cpu
        return max(0.0, system - self.process.cpu_percent(None) / 100)

    def update(self, step: int = 0) -> None:
        if not self.enabled:
            return
        others = self.others_busy_cores()
        threads = self.physical if others < 0.5 else max(1, min(self.physical, int(self.n_cpu - others + 0.3)))
        if threads != self.torch.get_num_threads():
            self.torch.set_num_threads(threads)
            self.changes.append([step, threads])

    def describe(self) -> str:
        mode = "adapts to the idle cores" if self.enabled else "fixed"
        return f"{self.torch.get_num_threads()} of {self.physical} physical cores ({mode})"


# ------------------------------------------------------------------------------------------------ terminal
def make_console(*, markup: bool = True, stderr: bool = False):
    """The one rich console: colour only on a terminal (rich honours NO_COLOR); off a terminal no 80-column wrap,
    so logs and CI keep whole table rows. markup=False prints generated text as is ("[x]" is no style tag)."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", 200))
    return Console(highlight=False, markup=markup, stderr=stderr, width=width)


class Progress:
    """A rich progress bar with ETA on a terminal; plain lines every ~15 s (and at the end) otherwise.

        with Progress(console, "MMLU", total=400) as progress: progress.advance(1, note="philosophy")
    """

    def __init__(self, console, description: str, total: int, already_done: int = 0, columns=()):
        self.console, self.description, self.total = console, description, total
        self.done = self.already_done = already_done  # resumed work: shown, but not in the rate behind the ETA
        self.start = self.last_print = time.perf_counter()
        self.bar = None
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *columns,
                                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                    console=console, transient=False)

    def __enter__(self):
        if self.bar:
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=self.total, completed=self.already_done)
        return self

    def advance(self, n: int = 1, note: str = ""):
        self.done += n
        if self.bar:
            self.bar.update(self.task, advance=n, description=f"{self.description} {note}".strip())
        elif time.perf_counter() - self.last_print > 15 or self.done >= self.total:
            self.last_print = time.perf_counter()
            elapsed = self.last_print - self.start
            new = self.done - self.already_done
            eta = elapsed / new * (self.total - self.done) if new else float("nan")
            print(f"  {self.description}: {self.done}/{self.total} {note} ({elapsed:.0f} s, ETA {eta:.0f} s)",
                  flush=True)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()
