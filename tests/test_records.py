"""records.py: the schema write_result enforces, the adapter that reads version-1 records, and the committed results.

tests/records_v1/ holds the committed version-1 records as they were written (lists cut to three items): the
benchmark, the fine-tune with its TRL baseline, the speculative demo before interleaved rounds (greedy and
sampling), and the retired speculative benchmark. Standard library and JSON only: no model is loaded.
"""
import json
from pathlib import Path

import pytest

import common
import records

REPO = Path(__file__).resolve().parents[1]
V1 = Path(__file__).with_name("records_v1")


def v1(name: str) -> dict:
    return json.loads((V1 / f"{name}.json").read_text())


def current(name: str) -> dict:
    return records.upgrade(v1(name))


def committed() -> list[Path]:
    return sorted((REPO / "results").glob("*.json"))


def strings(value, path="$", key=""):
    """(path, the key it sits under, text) for every string value in a record."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from strings(item, f"{path}.{name}", name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from strings(item, f"{path}[{index}]", key)
    elif isinstance(value, str):
        yield path, key, value


# ------------------------------------------------------------------------------------------- enforcement
@pytest.mark.parametrize("name, mutate, problem", [
    ("speculative-greedy", lambda r: r["methods"]["ours"]["alpha_by_prompt"].__setitem__(1, "0.9"),
     "$.methods.ours.alpha_by_prompt[1]: expected a number, got str"),
    ("finetune", lambda r: r["task"].pop("heldout_sha256"), "$.task.heldout_sha256: missing"),
    ("finetune", lambda r: r["after"].__setitem__("n", None), "$.after.n: must not be null"),
    ("benchmark", lambda r: r["mmlu"]["groups"]["stem"].__setitem__("n_correct", True),
     "$.mmlu.groups.stem.n_correct: expected int, got bool"),
    ("benchmark", lambda r: r["mmlu"].__setitem__("fewshot_source", "the first five test questions"),
     "$.mmlu.fewshot_source: 'the first five test questions' is not one of dev_first_n, test_first_n"),
    ("benchmark", lambda r: r["humaneval"].__setitem__("n_passed", 21),
     "$.humaneval: pass_at_1 must lie in [0, 1] and n_passed between 0 and the number of samples"),
    ("benchmark", lambda r: r["model"].__setitem__("source", "/home/ada/models/smollm2-135m"),
     "$.model.source: '/home/ada/models/smollm2-135m' is an absolute path"),
    ("speculative-benchmark", lambda r: r.__setitem__("status", "done"), "$.status: 'done' is not one of"),
    ("speculative-sampling", lambda r: r["lossless"].__setitem__("reason", "sampling: see the tests"),
     "$.lossless.reason: 'sampling: see the tests' is not one of sampling"),
])
def test_write_result_refuses_a_broken_record_before_any_file_exists(tmp_path, name, mutate, problem):
    record = current(name)
    assert records.record_error(record) is None
    mutate(record)
    with pytest.raises(ValueError, match="breaks the schema") as raised:
        common.write_result(record, tmp_path)
    assert problem in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_numbers_become_null_where_null_is_allowed_and_fail_where_it_is_not(tmp_path):
    record = current("benchmark")
    record["mmlu"]["micro"]["ci95_low"] = float("nan")
    record["speed"]["decode"]["tok_per_sec_mean"] = float("inf")
    written = json.loads(common.write_result(record, tmp_path, "b.json").read_text())
    assert written["mmlu"]["micro"]["ci95_low"] is None and written["speed"]["decode"]["tok_per_sec_mean"] is None
    record["mmlu"]["micro"]["n"] = float("nan")  # a count is never null
    with pytest.raises(ValueError, match=r"\$\.mmlu\.micro\.n: must not be null"):
        common.write_result(record, tmp_path, "c.json")
    # a file written by another tool may hold NaN, which Python's json reads: the reader refuses it
    text = (tmp_path / "b.json").read_text().replace('"ci95_low": null', '"ci95_low": NaN', 1)
    assert records.load(json.loads(text))[1] == "schema: $.mmlu.micro.ci95_low: nan is not a finite number"


def test_unknown_fields_are_kept_and_optional_ones_are_filled_in_as_null():
    """The policy: a writer may add a reading before the schema names it (kept, relied on by nobody); a key the
    schema marks optional is always there after load(), so a reader indexes it without .get()."""
    record = current("finetune")
    record["train"]["new_reading_sec"] = 1.5
    del record["after"]["field_f1"], record["model"]["hub_id"], record["baseline"]
    loaded, error = records.load(record)
    assert error is None and loaded["train"]["new_reading_sec"] == 1.5
    assert loaded["after"]["field_f1"] is None and loaded["model"]["hub_id"] is None and loaded["baseline"] is None
    assert "field_f1" not in record["after"]  # load() does not change its argument


def test_every_kind_has_a_version_and_result_record_uses_it():
    assert set(records.VERSIONS) == {"benchmark", "finetune", "speculative", "speculative_benchmark", "download",
                                     "chat", "mmlu_prefix_cache"}
    envelope = common.result_record("finetune", {"results_dir": REPO / "results", "models_dir": "/data/models",
                                                 "model": "/home/ada/my-model", "lora_rank": 16}, {})
    assert envelope["schema_version"] == records.VERSIONS["finetune"] == 2
    assert envelope["config"] == {"results_dir": "results", "models_dir": "models", "model": "my-model",
                                  "lora_rank": 16}


def test_foreign_and_future_records_are_named_not_read():
    assert records.load([1, 2])[1] == "not a billion-llm results record (no schema_version/kind)"
    assert "(1 to 3 for benchmark)" in records.load({**current("benchmark"), "schema_version": 4})[1]
    assert "unknown kind ['benchmark']" in records.load({**current("benchmark"), "kind": ["benchmark"]})[1]
    broken = v1("speculative-greedy")
    broken["lossless"] = "checked"  # too broken to upgrade: named, not a traceback
    assert records.load(broken)[1].startswith("schema: version 1 record that cannot be upgraded")


# ------------------------------------------------------------------------------------------------ paths
def test_portable_path_keeps_the_repository_layout_and_drops_everyone_elses():
    assert records.portable_path(REPO / "results" / "x.json") == "results/x.json"
    assert records.portable_path(REPO) == "."
    assert records.portable_path("/home/ada/models/qwen-coder-0.5b") == "qwen-coder-0.5b"
    assert records.portable_path("/usr/bin/python3.11") == "python3.11"
    assert records.portable_path("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert records.portable_path("models/smollm2-135m") == "models/smollm2-135m"
    assert records.portable_path(None) is None


# -------------------------------------------------------------------------------------------- version 1
def test_version_1_benchmark_keeps_its_numbers_and_loses_its_sentences():
    old, new = v1("benchmark"), current("benchmark")
    assert new["schema_version"] == 3 and records.record_error(new) is None
    assert new["humaneval"].get("batch_size") is None  # version 3's one addition: unknown before batching
    assert new["mmlu"]["micro"] == old["mmlu"]["micro"] and new["speed"]["decode"]["tok_per_sec_samples"] == \
        old["speed"]["decode"]["tok_per_sec_samples"] and new["humaneval"]["n_passed"] == 13
    assert new["model"]["source"] == "qwen-coder-0.5b" and new["config"]["results_dir"] == "results"
    assert new["mmlu"]["fewshot_source"] == "test_first_n" and "subjects_reason" not in new["mmlu"]
    assert new["mmlu"]["manifest"]["prompt_format"] == "lm_eval_mmlu"
    assert new["humaneval"]["prompt_format"] == "plain_completion"
    # before the namespace sandbox the record said "throwaway unprivileged uid per sample": that is level uid
    assert new["humaneval"]["isolation"] == new["humaneval"]["sandbox"]["isolation"] == "uid"
    assert new["humaneval"]["sandbox"]["interpreter"] == "python3.11" and "user" not in new["humaneval"]["sandbox"]
    assert "context" not in new["speed"]["decode"] and "ttft_definition" not in new["speed"]
    assert old["schema_version"] == 1 and "subjects_reason" in old["mmlu"]  # upgrade() works on a copy


def test_version_1_benchmark_from_todays_writer_keeps_its_sandbox_level():
    """Records written by the code before version 2 (say a run still going) name the level and carry sentences."""
    old = v1("benchmark")
    old["humaneval"]["isolation"] = "namespaces+uid"
    old["humaneval"]["sandbox"] = {"isolation": "namespaces+uid", "not_isolated": ["the CPU's caches"],
                                   "notes": [], "interpreter": "/usr/bin/python3", "isolated_mode": True,
                                   "layers": {"seccomp": "active", "keyring": "missing: no keyctl here"},
                                   "timeout_sec": 10.0, "rlimits": {"RLIMIT_CPU": 11},
                                   "verdict": "tests run in a trusted process; the sample only returns plain values"}
    new, error = records.load(old)
    assert error is None and new["humaneval"]["isolation"] == "namespaces+uid"
    assert set(new["humaneval"]["sandbox"]) == {"isolation", "layers", "interpreter", "isolated_mode", "timeout_sec",
                                                "rlimits"}
    assert new["humaneval"]["sandbox"]["layers"] == {"seccomp": True, "keyring": False}
    assert new["humaneval"]["sandbox"]["interpreter"] == "python3"


def test_the_schema_knows_the_sandbox_levels():
    import sandbox
    assert records.ISOLATION == set(sandbox.ISOLATION_WORDS)


def test_both_version_1_speculative_shapes_load():
    """speculative_demo.py changed shape without a new version: first one-pass speed-ups and notes, later paired
    ratios and ours_method. Version 2 keeps ratios null for the first and names ours_method in both."""
    for name in ("speculative-greedy", "speculative-sampling"):
        old, new = v1(name), current(name)
        assert "notes" in old and "notes" not in new and records.record_error(new) is None
        assert new["ratios"] is None and new["ours_method"] == "ours_adaptive"
        assert new["methods"] == old["methods"]
    assert current("speculative-sampling")["lossless"] == {"checked": False, "reason": "sampling"}
    merged = v1("speculative-greedy")
    merged.pop("notes")
    merged["ours_method"] = "ours"
    merged["ratios"] = {"ours": {"vs_target": 1.5, "vs_target_by_prompt": [2.0, 1.125], "vs_assisted": 0.9,
                                 "vs_assisted_by_prompt": [1.0, 0.81]}}
    new, error = records.load(merged)
    assert error is None and new["ratios"] == merged["ratios"] and new["ours_method"] == "ours"


def test_version_1_finetune_and_speculative_benchmark_load():
    tune = current("finetune")
    assert records.record_error(tune) is None and "description" not in tune["baseline"]
    old = v1("finetune")  # where the old path sits relative to this clone decides its form: the one rule
    assert tune["adapter_dir"] == "adapter" and tune["task"]["train_file"] == \
        records.portable_path(old["task"]["train_file"]) and not tune["task"]["train_file"].startswith("/")
    assert tune["config"]["output_dir"] == "run" and tune["after"] == v1("finetune")["after"]
    bench = current("speculative-benchmark")
    assert records.record_error(bench) is None
    assert (bench["temperature"], bench["k"], bench["repeats"], bench["ours_method"]) == (0.0, 5, 3, "ours_adaptive")


def test_migrate_results_rewrites_older_records_once_and_leaves_others_alone(tmp_path):
    for path in V1.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "foreign.json").write_text('{"hello": "world"}')
    (tmp_path / "broken.json").write_text("{not json")
    assert sorted(p.name for p in common.migrate_results(tmp_path)) == sorted(p.name for p in V1.glob("*.json"))
    assert common.migrate_results(tmp_path) == []
    assert json.loads((tmp_path / "foreign.json").read_text()) == {"hello": "world"}
    for path in V1.glob("*.json"):
        assert json.loads((tmp_path / path.name).read_text()) == current(path.stem)


# -------------------------------------------------------------------------------------- committed results
def test_committed_records_are_current_and_sound():
    assert committed()
    for path in committed():
        data = json.loads(path.read_text())
        assert records.record_error(data) is None, path.name
        assert data["schema_version"] == records.VERSIONS[data["kind"]], f"{path.name}: run common.migrate_results"


def test_committed_records_hold_no_absolute_path_and_no_prose():
    """Numbers and identifiers only. Long strings are data, named here: model output and prompts (finetune
    samples, speculative prompts and divergences), the training text, the MMLU subject list and hashes."""
    data_keys = {"text", "input", "expected", "before", "after", "trained_text", "mmlu_subjects", "target_text",
                 "other_text"}
    for path in committed():
        for where, key, text in strings(json.loads(path.read_text())):
            if key in data_keys:
                continue
            assert not text.startswith(("/", "~")), f"{path.name} {where}: {text[:60]}"
            assert len(text) <= 120, f"{path.name} {where}: {len(text)} characters of prose"


def test_version_2_benchmark_reads_as_version_3_with_no_batch_size():
    two = {**current("benchmark"), "schema_version": 2}
    three, error = records.load(two)
    assert error is None and three["schema_version"] == 3 and three["humaneval"]["batch_size"] is None
    assert three["mmlu"] == two["mmlu"] and three["speed"] == two["speed"]
