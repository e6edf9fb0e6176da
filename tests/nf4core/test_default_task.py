import pytest

from nf4core.default_task import TASK_NAME, DefaultTask, default_task, exact_match

REQUIRED = {"steps", "lr", "lora_r", "lora_alpha", "batch_size", "max_seq_len", "targets"}


def test_deterministic_and_heldout_is_unseen():
    a, b = default_task(seed=1), default_task(seed=1)
    assert a.train == b.train and a.heldout == b.heldout and a.recommended == b.recommended
    train_questions = {r["messages"][0]["content"] for r in a.train}
    heldout_questions = [r["messages"][0]["content"] for r in a.heldout]
    assert not any(q in train_questions for q in heldout_questions)
    assert len(set(heldout_questions)) == len(heldout_questions) == 100
    assert default_task(seed=2).train != a.train and default_task(seed=2).heldout != a.heldout
    # the default split is fixed across versions of numpy's generator (PCG64 is stable): a pin
    assert default_task().heldout[0]["messages"][0]["content"].endswith("\n6 5 2 8 5 8")


def test_records_have_the_chat_shape():
    task = default_task(n_train=20, n_heldout=5)
    assert isinstance(task, DefaultTask) and task.name == TASK_NAME
    for r in task.train + task.heldout:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
    conversation, answer = task.prompts_and_answers(task.heldout)[0]
    assert (
        conversation == task.heldout[0]["messages"][:1]
        and answer == task.heldout[0]["messages"][1]["content"]
    )


def test_answers_follow_the_rule():
    task = default_task(n_train=50, n_heldout=10)
    for conversation, answer in task.prompts_and_answers(task.train + task.heldout):
        digits = conversation[-1]["content"].splitlines()[-1].split()
        assert 3 <= len(digits) <= 6
        assert answer.split() == [str((int(d) + 1) % 10) for d in digits]


def test_trivial_answers_score_zero():
    """Copying the input or answering with a constant never matches: the skill must be learned."""
    task = default_task()
    pairs = task.prompts_and_answers(task.heldout)
    copies = [conv[-1]["content"].splitlines()[-1] for conv, _ in pairs]
    assert not any(exact_match(c, a) for c, (_, a) in zip(copies, pairs))
    common = max({a for _, a in pairs}, key=[a for _, a in pairs].count)
    assert sum(exact_match(common, a) for _, a in pairs) <= 1


def test_recommended_settings():
    rec = default_task().recommended
    assert REQUIRED <= rec.keys()
    assert 1 <= rec["steps"] <= 100 and 0 < rec["lr"] < 1e-2 and rec["lora_alpha"] > 0
    assert rec["warmup_steps"] <= rec["steps"] and rec["n_eval"] == 100
    # the longest answer (6 digits, 5 spaces) plus an end-of-turn token fits max_new_tokens
    assert rec["max_new_tokens"] >= 12
    assert set(rec["targets"]) <= {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_exact_match_and_bad_sizes():
    assert exact_match(" 1 2 3\n", "1 2 3") and not exact_match("1 2 4", "1 2 3")
    assert not exact_match("1 2 3 4", "1 2 3") and not exact_match("123", "1 2 3")
    with pytest.raises(ValueError, match="at least one"):
        default_task(n_train=0)
    with pytest.raises(ValueError, match="at least one"):
        default_task(n_heldout=0)
    with pytest.raises(ValueError, match="do not exist"):
        default_task(n_train=100, n_heldout=11, min_len=2, max_len=2)
