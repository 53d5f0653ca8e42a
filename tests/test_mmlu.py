"""mmlu.py: the offline MMLU test split, seeded subsets with excluded exemplars, lm-eval's prompt, and prefix-cached
scoring equal to plain full-prompt scoring in fp32 on tiny models and on SmolLM2."""
import math

import pytest

import common
import models
import mmlu

WHEELS = common.MODELS_DIR / ".wheels"


# ----------------------------------------------------------------------------------------- MMLU data
@pytest.fixture(scope="module")
def mmlu_offline():
    return mmlu.mmlu_from_wheel(WHEELS)


def test_offline_mmlu_is_the_test_split(mmlu_offline):
    by_subject, source = mmlu_offline
    assert source["n_dropped_malformed"] == 2
    assert len(by_subject) == 57 and sum(map(len, by_subject.values())) == 14042
    assert set(mmlu.MMLU_SUBJECTS) <= set(by_subject)
    assert all(len(by_subject[s]) >= 100 for s in mmlu.MMLU_SUBJECTS)
    assert len(set(mmlu.MMLU_SUBJECTS.values())) == 4  # STEM, humanities, social sciences, other


def test_fewshot_exemplars_excluded_and_limit_seeded():
    subjects = ["marketing", "philosophy"]
    data, manifest = mmlu.load_mmlu(subjects, 5, 7, seed=3, use_hub=False, cache_dir=WHEELS)
    again, _ = mmlu.load_mmlu(subjects, 5, 7, seed=3, use_hub=False, cache_dir=WHEELS)
    other, _ = mmlu.load_mmlu(subjects, 5, 7, seed=4, use_hub=False, cache_dir=WHEELS)
    for subject in subjects:
        exemplar_ids = [q.question_id for q in data[subject]["exemplars"]]
        scored_ids = [q.question_id for q in data[subject]["questions"]]
        assert exemplar_ids == [f"{subject}/{i}" for i in range(5)]
        assert len(scored_ids) == 7 and not set(exemplar_ids) & set(scored_ids)
        assert scored_ids == [q.question_id for q in again[subject]["questions"]]
        assert manifest["subjects"][subject]["question_ids"] == scored_ids
    assert any(data[s]["questions"] != other[s]["questions"] for s in subjects)
    assert manifest["fewshot_source"] == "test_first_n"  # no dev split offline: exemplars are not scored


def test_prompt_is_lm_eval_mmlu_format():
    q = mmlu.MMLUQuestion
    shot = q("x/0", "  What is 1+1? ", ("1", "2", "3", "4"), 1)
    question = q("x/1", "Pick C.", ("a", "b", "c", "d"), 2)
    context = mmlu.mmlu_context("high_school_us_history", [shot, shot], question)
    expected = ("The following are multiple choice questions (with answers) about high school us history.\n\n"
                "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                "Pick C.\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert context == expected


def test_shared_prefix_follows_the_full_prompt_tokens():
    """The shared prefix comes from the full prompts' own token ids: never a separately tokenized prefix."""
    rows = [mmlu.ScoringRow([5, 6, 7, 8, 9], {0: [1]}), mmlu.ScoringRow([5, 6, 7, 3], {0: [1]}),
            mmlu.ScoringRow([5, 6, 7, 8], {0: [1]})]
    assert mmlu.shared_prefix_length(rows) == 3
    assert mmlu.shared_prefix_length(rows[:1]) == 4  # a lone row keeps one token of its own
    assert mmlu.shared_prefix_length([rows[0], rows[0]]) == 4


# ------------------------------------------------------------------------------ prefix cache == plain
def compare_cached_with_plain(path, subjects, limit, batch_size, dtype="float32"):
    loaded = models.load_model(str(path), device="cpu", dtype=dtype, log=lambda *_: None)
    data, _ = mmlu.load_mmlu(subjects, 5, limit, seed=0, use_hub=False, cache_dir=WHEELS)
    for subject in subjects:
        d = data[subject]
        plain, plain_info = mmlu.score_mmlu_subject(loaded.model, loaded.tokenizer, subject, d["exemplars"],
                                                         d["questions"], use_cache=False, batch_size=1)
        chunks = []
        cached, info = mmlu.score_mmlu_subject(loaded.model, loaded.tokenizer, subject, d["exemplars"],
                                                    d["questions"], use_cache=True, batch_size=batch_size, chunk=2,
                                                    on_chunk=lambda qs, ss: chunks.append(len(qs)))
        assert info["shared_prefix_tokens"] > 100, "the prefix cache was not used"
        assert sum(chunks) == limit and len(chunks) == math.ceil(limit / 2)
        assert plain_info["shared_prefix_tokens"] == 0
        assert [mmlu.argmax(s) for s in cached] == [mmlu.argmax(s) for s in plain]
        assert [x for s in cached for x in s] == pytest.approx([x for s in plain for x in s], abs=2e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_prefix_cached_scoring_equals_plain_tiny(tiny_models, arch):
    compare_cached_with_plain(tiny_models[arch], ["world_religions"], limit=5, batch_size=3)


@pytest.fixture
def one_thread():
    """On a busy shared 2-core machine two torch threads spin against each other (several times slower)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_prefix_cached_scoring_equals_plain_smollm2(smollm2, one_thread):
    compare_cached_with_plain(smollm2, ["world_religions", "marketing"], limit=2, batch_size=2)
