"""finetune.py and finetune_demo.py on a tiny random Llama: loss goes down, the adapter round-trips, Ctrl-C
checkpoints resume, the answer-only loss covers exactly the answer, a --target-modules typo is refused before the
baseline evaluation, bad dataset lines are named by file and line, and the committed datasets are what the
generator writes."""
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
import finetune_demo

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--epochs", "4", "--batch-size", "4", "--lr", "1e-2", "--max-new-tokens", "8", "--eval-batch-size", "4",
             "--threads", "1"]  # a 64-wide model gains nothing from 2 threads, and a busy machine stalls them


@pytest.fixture(autouse=True)
def restore_torch_threads():
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """8 training and 4 held-out examples taken from the real files."""
    folder = tmp_path_factory.mktemp("task")
    lines = (REPO / "data" / "finetune_train.jsonl").read_text().splitlines(keepends=True)
    held = (REPO / "data" / "finetune_heldout.jsonl").read_text().splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(lines[:8]))
    (folder / "heldout.jsonl").write_text("".join(held[:4]))
    return folder


def task_args(tiny_models, tiny_task, out: Path) -> list[str]:
    return ["--model", str(tiny_models["llama"]), "--train-file", str(tiny_task / "train.jsonl"),
            "--heldout-file", str(tiny_task / "heldout.jsonl"), "--output-dir", str(out), *TINY_ARGS]


def only_result(results_dir: Path) -> dict:
    files = sorted(results_dir.glob("finetune-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_committed_datasets_match_generator_and_are_disjoint():
    assert subprocess.run([sys.executable, "data/make_finetune_data.py", "--check"], cwd=REPO).returncode == 0
    train = finetune.load_jsonl(REPO / "data" / "finetune_train.jsonl")
    heldout = finetune.load_jsonl(REPO / "data" / "finetune_heldout.jsonl")
    assert len(train) == 100 and len(heldout) >= 40
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}


def test_bad_dataset_line_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Send 2 pens to Cork.", "record": {"n": 2}}\n\n{"text": "x", "record": {"n": 1}\n')
    assert finetune_demo.main(["--train-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: not valid JSON" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad.write_text('{"text": "", "record": {"n": 2}}\n')
    assert finetune_demo.main(["--train-file", str(bad)]) == 2
    assert f"{bad}:1: 'text' must be a non-empty string" in capsys.readouterr().err


def test_warmup_is_a_deprecated_alias_of_warmup_steps(capsys):
    assert finetune_demo.parse_args(["--warmup", "3"]).warmup_steps == 3
    assert "--warmup is deprecated" in capsys.readouterr().err
    assert finetune.recipe_from(vars(finetune_demo.parse_args([]))) == finetune.DEFAULTS


def test_non_utf8_training_file_is_named_by_line(tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "Send 2 pens", "record": {"n": 2}}\n{"text": "Caf\u00e9 order", "record": {"n": 1}}\n'
                    .encode("latin-1"))
    assert finetune_demo.main(["--train-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not UTF-8 text (byte 0xe9" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--results-dir", "--output-dir"])
def test_unwritable_output_folder_is_refused_before_the_model_loads(flag, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folders were checked")
    monkeypatch.setattr(finetune, "load_for_finetune", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert finetune_demo.main([flag, str(blocker), "--results-dir" if flag == "--output-dir" else "--output-dir",
                               str(tmp_path / "ok")]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert finetune_demo.main(["--resume", "--output-dir", str(tmp_path / "empty"), "--results-dir", str(tmp_path)]) == 2
    assert "No checkpoint in" in capsys.readouterr().err


def test_scoring_is_exact_and_field_level():
    examples = [{"record": {"cust": "Lopez, Maria", "n": 3, "due": None}},
                {"record": {"cust": "Smith, James", "n": 1, "due": "FRI"}}]
    answers = ['{"cust":"Lopez, Maria","n":3,"due":null}', 'Sure! {"cust": "Smith, James", "n": 2, "due": "FRI"}']
    result = finetune.score(answers, examples)
    assert result["metric"] == 0.5 and result["json_valid_rate"] == 1.0
    assert result["field_f1"] == pytest.approx(5 / 6)
    assert finetune.score(["no json here", "{}"], examples)["metric"] == 0.0


def test_training_lowers_loss_and_adapter_round_trips(tiny_models, tiny_task, tmp_path, results_dir):
    import torch
    from peft import PeftModel
    from rich.console import Console

    import common

    import models
    console = Console(quiet=True)
    recipe = dataclasses.replace(finetune.DEFAULTS, epochs=4, lr=1e-2)  # as TINY_ARGS, without argparse
    loaded, cpu_threads = finetune.load_for_finetune(
        str(tiny_models["llama"]), device="cpu", dtype="auto", quantize="none", max_length=recipe.max_length,
        models_dir=None, threads=1, console=console)
    rows = finetune.load_jsonl(tiny_task / "train.jsonl")
    trained = finetune.train(loaded, rows, recipe=recipe, output_dir=tmp_path / "run", resume=False,
                                  console=console, cpu_threads=cpu_threads)
    record = trained["record"]
    curve = record["loss_curve"]
    assert len(curve) == record["n_steps"] == 8
    assert sum(curve[-2:]) / 2 < 0.8 * sum(curve[:2]) / 2, curve
    check = record["completion_only_loss"]  # trl masked exactly the prompt: the loss covers the answer only
    assert check["verified"] and check["trained_text"].startswith(finetune.record_json(rows[0]["record"]))
    assert 0 < check["n_answer_tokens_trained"] < check["n_prompt_tokens_masked"] + check["n_answer_tokens_trained"]
    assert finetune.weight_change(trained["initial_weights"], trained["model"])["adapter_weights_changed"]

    model = trained["model"]
    model.save_pretrained(str(tmp_path / "adapter"))
    assert finetune.adapter_roundtrip_identical(model, tmp_path / "adapter")
    probe = loaded.tokenizer("Ship 3 pens to Cork for Ada Lovelace.", return_tensors="pt")
    model.eval()
    autocast = finetune.autocast_context  # the demo evaluates under the training autocast, before and after
    with torch.no_grad(), autocast("cpu", loaded.dtype):
        trained_logits = model(**probe).logits.float()
    fresh = models.load_model(str(tiny_models["llama"]), device="cpu", dtype=loaded.dtype, log=lambda *_: None)
    with torch.no_grad(), autocast("cpu", loaded.dtype):
        base_logits = fresh.model(**probe).logits.float()
        reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter")).eval()
        assert torch.equal(reloaded(**probe).logits.float(), trained_logits)  # bit-identical after the round trip
    assert not torch.allclose(base_logits, trained_logits, atol=1e-2)  # and the adapter does change the model


def test_demo_end_to_end_then_eval_adapter_reproduces(tiny_models, tiny_task, tmp_path, results_dir, capsys):
    out = tmp_path / "run"
    # adapters on the top layer of 2: the frozen bottom's output is computed once per example and replayed
    assert finetune_demo.main(task_args(tiny_models, tiny_task, out) + ["--results-dir", str(results_dir),
                                                                        "--lora-top-share", "0.5"]) == 0
    result = only_result(results_dir)
    assert result["kind"] == "finetune" and result["status"] == "complete"
    assert result["train"]["lora_layers"] == {"n_layers": 2, "n_adapted": 1, "frozen_outputs_computed": 8,
                                              "frozen_outputs_reused": 24}  # 8 examples x 4 epochs
    assert result["after"]["heldout_loss"] < result["before"]["heldout_loss"]
    assert result["before"]["n"] == result["after"]["n"] == 4
    assert result["checks"]["adapter_weights_changed"] and result["checks"]["adapter_roundtrip_identical"]
    assert result["train"]["train_sec"] > 0 and result["train"]["peak_rss_bytes"] > 0
    assert len(result["samples"]) == 4 and {"input", "expected", "before", "after"} <= set(result["samples"][0])
    assert not list(out.glob("checkpoint-*"))
    capsys.readouterr()
    assert finetune_demo.main(["--eval-adapter", str(out / "adapter")]) == 0
    assert "4/4 answers identical -> reproduced" in capsys.readouterr().out.replace("\n", " ")


def test_ctrl_c_checkpoints_and_resume_finishes(tiny_models, tiny_task, tmp_path, results_dir, monkeypatch):
    make_callback = finetune.make_progress_callback

    def interrupting_callback(*args, **kwargs):
        callback = make_callback(*args, **kwargs)
        on_step_begin = callback.on_step_begin

        def press_ctrl_c_at_step_3(arguments, state, control, **rest):
            on_step_begin(arguments, state, control, **rest)
            if state.global_step == 2:
                signal.raise_signal(signal.SIGINT)  # what the terminal sends; our handler must not raise
        callback.on_step_begin = press_ctrl_c_at_step_3
        return callback

    out = tmp_path / "run"
    argv = task_args(tiny_models, tiny_task, out) + ["--results-dir", str(results_dir)]
    monkeypatch.setattr(finetune, "make_progress_callback", interrupting_callback)
    assert finetune_demo.main(argv) == 130
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not list(results_dir.glob("*.json"))
    monkeypatch.setattr(finetune, "make_progress_callback", make_callback)
    assert finetune_demo.main(argv + ["--resume"]) == 0
    train = only_result(results_dir)["train"]
    assert train["resumed_from_step"] == 3 and train["n_steps"] == 8
    # the record's training figures are totals over both runs: all 8 steps' losses and times, summed tokens
    assert train["n_parts"] == 2 and len(train["loss_curve"]) == len(train["step_sec_samples"]) == 8
    assert train["n_tokens"] > 0 and train["train_sec"] >= sum(train["step_sec_samples"])
    assert not (out / finetune.PARTS_FILE).exists()


def test_target_module_typo_is_refused_before_the_baseline_evaluation(tiny_models, tiny_task, tmp_path, capsys,
                                                                     monkeypatch):
    def no_evaluation(*args, **kwargs):
        raise AssertionError("the baseline evaluation ran before --target-modules was checked")
    monkeypatch.setattr(finetune, "evaluate_heldout", no_evaluation)
    argv = task_args(tiny_models, tiny_task, tmp_path / "run") + ["--results-dir", str(tmp_path / "results")]
    assert finetune_demo.main(argv + ["--target-modules", "q_proj,foo_proj"]) == 2
    err = capsys.readouterr().err
    assert "--target-modules foo_proj:" in err and "q_proj" in err.split("choose from")[1]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_training_dtype_is_float32_on_a_cpu_without_fast_bf16(monkeypatch):
    import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "packing_problem", lambda dtype: "this CPU has no bf16 support in oneDNN")
    assert finetune.training_dtype("cpu", "auto") == "float32"
    assert finetune.training_dtype("cpu", "bfloat16") == "bfloat16"  # an explicit --dtype is obeyed
    monkeypatch.setattr(cpu_kernels, "packing_problem", lambda dtype: None)
    assert finetune.training_dtype("cpu", "auto") == "bfloat16"


def test_answer_only_loss_covers_exactly_the_answer_and_ignores_padding(tiny_models, tiny_task):
    """answer_nll (the head run on answer positions only) equals the full-vocabulary loss over all positions with
    the prompt masked, in fp32; and a padded batch gives the sum of the examples' losses one by one."""
    import torch

    import models
    loaded = models.load_model(str(tiny_models["llama"]), device="cpu", dtype="float32", log=lambda *_: None)
    tokenizer, spec, model = loaded.tokenizer, loaded.resolved.spec, loaded.model.eval()
    rows = finetune.load_jsonl(tiny_task / "train.jsonl")[:3]
    encoded = [finetune.encode_example(row, tokenizer, spec) for row in rows]

    def batch(chunk):
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
        for row, (ids, n_prompt) in enumerate(chunk):
            input_ids[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), 1
            labels[row, n_prompt:len(ids)] = input_ids[row, n_prompt:len(ids)]
        return input_ids, mask, labels

    with torch.no_grad():
        input_ids, mask, labels = batch(encoded)
        nll, n_tokens, _ = finetune.answer_nll(model, labels, input_ids=input_ids, attention_mask=mask)
        assert int(n_tokens) == sum(len(ids) - n_prompt for ids, n_prompt in encoded)
        full = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        reference = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
                                                      ignore_index=-100, reduction="sum")
        assert float(nll) == pytest.approx(float(reference), rel=1e-5)
        one_by_one = sum(float(finetune.answer_nll(model, batch([e])[2], input_ids=batch([e])[0],
                                                   attention_mask=batch([e])[1])[0]) for e in encoded)
        assert float(nll) == pytest.approx(one_by_one, rel=1e-4)


@pytest.mark.parametrize("arch", ["gpt_neox"])  # parallel residual, partial rotary: the least Llama-like seed
def test_reused_frozen_layers_give_the_same_loss_and_gradients(tiny_models, tiny_task, arch):
    """With adapters on the top layers only, a step that replays the frozen bottom's saved output (computed per
    example, alone) gives the loss and adapter gradients of the full forward over the padded batch; a second
    epoch reuses the saved output instead of computing it again; a left-padded batch is not replayed."""
    import torch
    from peft import get_peft_model

    import models
    import transformers_internals as hf
    loaded = models.load_model(str(tiny_models[arch]), device="cpu", dtype="float32", log=lambda *_: None)
    recipe = dataclasses.replace(finetune.DEFAULTS, lora_top_share=0.5)
    n_bottom = finetune.frozen_bottom_layers(recipe, loaded.model)
    assert n_bottom == 1  # 2 layers: the top one adapted
    model = get_peft_model(loaded.model, finetune.lora_config(recipe, loaded.model))
    for name, p in model.named_parameters():  # adapters exist on the top layer only, and start non-zero
        assert p.requires_grad == ("lora_" in name) and (not p.requires_grad or ".layers.1." in name), name
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    encoded = [finetune.encode_example(row, loaded.tokenizer, loaded.resolved.spec)
               for row in finetune.load_jsonl(tiny_task / "train.jsonl")[:3]]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.zeros((3, width), dtype=torch.long)
    mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), 1
        labels[row, n_prompt:len(ids)] = input_ids[row, n_prompt:len(ids)]

    def loss_and_grads(replay=None):
        model.zero_grad()
        if replay is None:
            nll, _, _ = finetune.answer_nll(model, labels, input_ids=input_ids, attention_mask=mask)
        else:
            hidden = replay.batch(input_ids, mask)
            with hf.skip_bottom_layers(model, n_bottom, hidden):
                nll, _, _ = finetune.answer_nll(model, labels, input_ids=input_ids, attention_mask=mask)
        nll.backward()
        return float(nll.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want_loss, want_grads = loss_and_grads()
    frozen = finetune.FrozenBottom(model, n_bottom)
    for epoch in range(2):
        got_loss, got_grads = loss_and_grads(frozen)
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert (frozen.n_computed, frozen.n_reused) == (3, 3)
    assert type(hf.decoder_layers(model)[0]).__name__ != "Replay"  # the real layer is back after the block
    assert frozen.batch(input_ids.flip(1), mask.flip(1)) is None  # left padding: no replay, the full forward runs


def test_no_frozen_bottom_where_layers_are_not_interchangeable(tiny_models, monkeypatch):
    """A model whose layers differ by type (sliding and full attention picked by index) keeps adapters on every
    layer, as does lora_top_share 1."""
    import models
    loaded = models.load_model(str(tiny_models["llama"]), device="cpu", dtype="float32", log=lambda *_: None)
    assert finetune.frozen_bottom_layers(dataclasses.replace(finetune.DEFAULTS, lora_top_share=1.0),
                                         loaded.model) == 0
    loaded.model.config.layer_types = ["sliding_attention", "full_attention"]
    assert finetune.frozen_bottom_layers(finetune.DEFAULTS, loaded.model) == 0
    assert finetune.lora_config(finetune.DEFAULTS, loaded.model).layers_to_transform is None
