"""common.py: results writing, JSON reading, the environment block, memory readings."""
import json

import pytest

import common
import records


def test_results_are_written_atomically_with_schema(tmp_path):
    model = {"name": "m/x", "dtype": "bfloat16", "quantization": "none"}
    environment = {"python": "3.11", "platform": "Linux", "device": "cpu", "versions": {}}
    record = common.result_record("chat", {"seed": 1}, environment, model=model, models=[model], transcript=[],
                                  n_replies=0, score=float("nan"), values=[1.0, float("inf")])
    path = common.write_result(record, tmp_path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == records.VERSIONS["chat"] and data["kind"] == "chat"
    assert data["score"] is None and data["values"] == [1.0, None]
    assert path.name.startswith("chat-m-x-") and list(tmp_path.iterdir()) == [path]
    with pytest.raises(TypeError):  # a failing write leaves neither a partial target nor a temp file
        common.write_json_atomic(tmp_path / "bad.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_read_json_errors(tmp_path):
    with pytest.raises(common.UserError, match="does not exist"):
        common.read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(common.UserError, match="not valid JSON"):
        common.read_json(tmp_path / "bad.json")


def test_environment_block_names_versions_and_hardware():
    env = common.environment("cpu")
    assert env["versions"]["torch"] and env["versions"]["transformers"]
    assert env["n_cpu"] >= 1 and env["cpu"] and env["ram_total_bytes"] > 0




def test_a_single_sample_has_no_spread_to_show():
    """One repetition: the stddev is unknown (null in a record), and the table shows the mean without "+- 0.0"."""
    mean, spread = common.mean_stddev([12.0])
    assert mean == 12.0 and spread != spread  # nan
    assert common.plus_minus(mean, spread) == "12.0" and common.plus_minus(12.0, None) == "12.0"
    assert common.plus_minus(*common.mean_stddev([10.0, 14.0])) == "12.0 +- 2.8"


def test_memory_reading_is_the_process_rss_on_cpu_and_the_monitor_peaks_above_it():
    now, kind = common.memory_reading("cpu")
    peak, _ = common.memory_reading("cpu", peak=True)
    assert kind == "rss" and 0 < now <= peak
    with common.MemoryMonitor("cpu") as monitor:
        ballast = bytearray(64 * 2**20)  # 64 MiB touched while the monitor samples
        ballast[::4096] = b"x" * len(ballast[::4096])
        monitor.sample()
    assert monitor.result()["peak_rss_bytes"] >= now + 32 * 2**20
    del ballast
