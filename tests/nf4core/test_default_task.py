import pytest

from nf4core.default_task import default_task, exact_match


def test_deterministic_and_heldout_is_unseen():
    a, b = default_task(seed=1), default_task(seed=1)
    assert a.train == b.train and a.heldout == b.heldout
    train_questions = {r["messages"][0]["content"] for r in a.train}
    assert not any(r["messages"][0]["content"] in train_questions for r in a.heldout)
    assert default_task(seed=2).train != a.train


def test_answers_follow_the_rule():
    task = default_task(n_train=50, n_heldout=10)
    for conversation, answer in task.prompts_and_answers(task.train + task.heldout):
        digits = conversation[-1]["content"].splitlines()[-1].split()
        assert answer.split() == [str((int(d) + 1) % 10) for d in digits]


def test_exact_match_and_bad_sizes():
    assert exact_match(" 1 2 3\n", "1 2 3") and not exact_match("1 2 4", "1 2 3")
    with pytest.raises(ValueError, match="at least one"):
        default_task(n_train=0)
