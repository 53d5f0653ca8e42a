"""requirements.txt pins every package, it was compiled from requirements.in, and each fence around a library's
private API (hub.py, cpu_kernels.py, transformers_internals.py) was checked on exactly the pinned release: bump a
pin and this fails until the fence is checked on the new version."""
import re
from pathlib import Path

import cpu_kernels
import hub
import transformers_internals

REPO = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*([<>=!~]=?[^;#]*)?")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: huggingface_hub == huggingface-hub


def requirements(path: Path) -> dict:
    """{normalized name: specifier} of every requirement line (comments, markers and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        match = REQUIREMENT.match(line.strip())
        if match and not line.startswith((" ", "#", "-")):
            out.setdefault(normalized(match[1]), (match[3] or "").strip())
    return out


PINS = requirements(REPO / "requirements.txt")


def pinned(name: str) -> str:
    specifier = PINS.get(normalized(name))
    assert specifier is not None, f"{name} is not in requirements.txt"
    return specifier.removeprefix("==")


def test_every_requirement_is_pinned_to_one_version():
    loose = {name: spec for name, spec in PINS.items() if not re.fullmatch(r"==[\w.+!-]+", spec)}
    assert PINS and not loose, f"not pinned to one version: {loose}"


def test_the_pins_cover_the_ranges_file_and_drop_evaluate():
    wanted = requirements(REPO / "requirements.in")
    assert set(wanted) <= set(PINS), f"in requirements.in but not compiled: {set(wanted) - set(PINS)}"
    assert "evaluate" not in PINS  # never imported; its metrics load from the Hub at run time


def test_the_fences_were_checked_on_the_pinned_versions():
    assert transformers_internals.VERIFIED_TRANSFORMERS == pinned("transformers"), \
        "transformers_internals.py was checked on another transformers than requirements.txt pins"
    for package, version in hub.CHECKED_ON.items():
        assert version == pinned(package), f"hub.py was checked on {package} {version}, the pin is {pinned(package)}"
    torch_minor = ".".join(pinned("torch").split(".")[:2])
    assert torch_minor in cpu_kernels.VERIFIED_TORCH, \
        f"cpu_kernels.py was verified on torch {cpu_kernels.VERIFIED_TORCH}, the pin is {pinned('torch')}"
