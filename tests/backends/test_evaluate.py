"""Exact match by batched greedy decoding: each backend's `greedy_batch` against its own one-prompt
`generate`, and the grouping / budget logic of `exact_match_score` against a scripted engine."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from backends import api
from backends.engine import LoRASettings, check_one_length, rows_until_stop
from backends.evaluate import exact_match_score, prompt_and_answer, stop_ids
from tests.backends.finetune_fixtures import chat_records, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("evaluate") / "model")


def _load(model_dir, backend: str) -> api.LoadedModel:
    pytest.importorskip("torch" if backend == "torch" else "mlx.core")
    return api.load(
        model_dir,
        lora=LoRASettings(r=4, alpha=8.0, seed=1),
        backend=backend,
        device="cpu",
        compute_dtype="float32",
    )


def _one_by_one(engine, prompt, max_new, eos) -> list[int]:
    out = []
    for t in engine.generate(prompt, max_new, eos_ids=eos):
        if t in eos:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_greedy_batch_equals_generate_per_prompt(model_dir, backend):
    m = _load(model_dir, backend)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(5, 300, 9).tolist() for _ in range(5)]
    free = [_one_by_one(m.engine, p, 8, ()) for p in prompts]
    assert len({tuple(f) for f in free}) > 1  # the rows really differ
    row = next(i for i, f in enumerate(free) if f[2] not in f[:2])
    eos = (free[row][2],)  # that row stops after two tokens; others stop wherever that token comes
    want = [_one_by_one(m.engine, p, 8, eos) for p in prompts]
    assert want[row] == free[row][:2]
    assert m.engine.greedy_batch(prompts, 8, eos) == want
    assert m.engine.greedy_batch(prompts, 8) == free


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_exact_match_predictions_equal_one_prompt_at_a_time(model_dir, backend):
    m = _load(model_dir, backend)
    records = chat_records(n=10, seed=2)
    eos = stop_ids(m.tokenizer)
    want = []
    for r in records:
        prompt, reference = prompt_and_answer(r, m.tokenizer)
        budget = len(m.tokenizer.encode(reference, add_special_tokens=False)) + 4
        want.append(
            m.tokenizer.decode(_one_by_one(m.engine, prompt, budget, eos), skip_special_tokens=True)
        )
    assert len({len(prompt_and_answer(r, m.tokenizer)[0]) for r in records}) > 1  # several groups
    got = exact_match_score(m.engine, m.tokenizer, records, keep_samples=len(records), max_batch=3)
    assert [p for p, _ in got.samples] == want


class ScriptedEngine:
    """Answers each prompt with fixed token rows; records every batched call."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]]) -> None:
        self.answers, self.calls = answers, []

    def inference(self):
        return contextlib.nullcontext()

    def greedy_batch(self, prompts, max_new_tokens, eos_ids=()):
        check_one_length(prompts)
        self.calls.append((len(prompts[0]), len(prompts), max_new_tokens))
        return [self.answers[tuple(p)][:max_new_tokens] for p in prompts]


class CharTokenizer:
    """One token per character (ord), no special tokens."""

    eos_token_id = None
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))

    def token_id(self, _):
        return None


def test_exact_match_groups_by_length_caps_batches_and_budgets_each_answer(monkeypatch):
    import backends.evaluate as evaluate

    monkeypatch.setattr(evaluate, "stop_ids", lambda tok: ())
    records, answers = [], {}
    for _i, (prompt, reference, produced) in enumerate(
        [
            ("ab", "12", "12"),  # right
            ("cd", "34", "35"),  # wrong
            (
                "ef",
                "5",
                "5     xyz",
            ),  # right answer, then more than its budget (1 + 4): cut, trimmed
            ("ghi", "7", "7"),
            ("jkl", "8", "9"),
            ("mno", "0", "0"),
            ("pqr", "1", "1"),
            ("z", "22", "22x"),  # one token too many within budget: wrong
        ]
    ):
        records.append({"prompt": prompt, "completion": reference})
        answers[tuple(map(ord, prompt))] = [ord(c) for c in produced]
    engine = ScriptedEngine(answers)
    got = exact_match_score(engine, CharTokenizer(), records, keep_samples=8, max_batch=3)
    assert (got.correct, got.total) == (5, 8)
    assert got.samples[2] == ("5    ", "5")
    # (prompt length, rows, token budget): one length per call, at most 3 rows
    assert sorted(engine.calls) == [(1, 1, 6), (2, 3, 6), (3, 1, 5), (3, 3, 5)]


def test_rows_until_stop_stops_drawing_once_every_row_stopped():
    drawn = []

    def steps():
        for row in ([1, 2], [9, 3], [4, 9], [5, 6], [7, 8]):
            drawn.append(row)
            yield np.array(row)

    assert rows_until_stop(steps(), 2, eos_ids=(9,)) == [[1], [2, 3]]
    assert len(drawn) == 3


def test_greedy_batch_refuses_mixed_lengths():
    with pytest.raises(ValueError, match="one length"):
        check_one_length([[1, 2], [3]])
    with pytest.raises(ValueError, match="one length"):
        check_one_length([[]])
