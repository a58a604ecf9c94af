"""Tasks, loaders and rewards of the training loop, on small fixture files in each supported format."""

from __future__ import annotations

import json

import pytest
from test_train_support import char_tokenizer

from nreft_engine.train.data import arithmetic_task, batch_at, load_task, render_prompts
from nreft_engine.train.rewards import (
    compute_rewards,
    extract_answer,
    math_verify_reward,
    numeric_match,
    resolve_reward,
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_arithmetic_task_is_seeded_and_heldout_is_disjoint():
    a = arithmetic_task(seed=3, difficulty=1, num_heldout=200)
    b = arithmetic_task(seed=3, difficulty=1, num_heldout=200)
    assert a == b and len(a.heldout) == 200 and len(a.train) > 100
    assert not {p.question for p in a.heldout} & {p.question for p in a.train}
    p = a.train[0]
    x, _, y, _, _ = p.question.split()
    assert int(p.answer) == int(x) + int(y)
    assert arithmetic_task(seed=4).heldout != a.heldout
    hard = arithmetic_task(seed=0, difficulty=3, num_heldout=50)
    assert all(len(p.question.split()) == 7 for p in hard.heldout)


def test_batches_follow_the_step_only():
    task = arithmetic_task(seed=0, num_heldout=200)
    assert batch_at(task, 5, 4, seed=1) == batch_at(task, 5, 4, seed=1)
    epoch = [p for step in range(len(task.train) // 4) for p in batch_at(task, step, 4, seed=1)]
    assert len(set(epoch)) == len(epoch)  # one epoch visits each problem once


def test_loaders_read_gsm8k_svamp_and_math_files(tmp_path):
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": f"Tom has {i} apples and buys 2. How many?",
         "answer": f"{i} + 2 = <<{i}+2>>\n#### {i + 2:,}"}
        for i in range(998, 1008)])
    task = load_task("gsm8k", gsm, num_heldout=4)
    assert len(task.heldout) == 4 and len(task.train) == 6
    assert {p.answer for p in task.train + task.heldout} == {str(i + 2) for i in range(998, 1008)}

    svamp = tmp_path / "SVAMP.json"
    svamp.write_text(json.dumps([
        {"Body": f"There are {i} birds.", "Question": "How many birds?", "Answer": float(i)} for i in range(6)
    ]))
    task = load_task("svamp", str(svamp), num_heldout=2)
    assert {p.answer for p in task.train + task.heldout} == {str(i) for i in range(6)}
    assert all(p.question.endswith("How many birds?") for p in task.train)

    math = _write_jsonl(tmp_path / "math.jsonl", [
        {"problem": f"Compute {i}/2.", "solution": f"It is $\\boxed{{\\frac{{{i}}}{{2}}}}$."}
        for i in range(5)])
    task = load_task("math", math, num_heldout=1)
    assert {p.answer for p in task.train + task.heldout} == {f"\\frac{{{i}}}{{2}}" for i in range(5)}


def test_prompts_go_through_the_chat_template():
    tok = char_tokenizer()
    ids = render_prompts(tok, arithmetic_task(0).heldout[:2], system="Be brief.")
    text = tok.decode(ids[0])
    assert text.startswith("s:Be brief.\nu:") and text.endswith("= ?\na:")


@pytest.mark.parametrize("completion, expected", [
    ("so 3 + 4 = 7", "7"),
    ("reasoning 12 then #### 1,234", "1234"),
    ("the answer is $\\boxed{\\frac{1}{2}}$ not 3", "\\frac{1}{2}"),
    ("no digits", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_builtin_rewards():
    completions = ["The answer is 12.", "12.0", "It is 13", "#### 1,000", "nothing"]
    answers = ["12", "12", "12", "1000", "5"]
    assert numeric_match(None, completions, None, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0]
    got = math_verify_reward(None, ["so $\\boxed{0.5}$", "$\\frac{2}{4}$", "$\\boxed{3}$"], None,
                             answer=["\\frac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}"])
    assert got == [1.0, 1.0, 0.0]


def test_user_reward_functions_have_the_trl_signature():
    def length_bonus(prompts, completions, completion_ids, **columns):
        assert columns["answer"] == ["1", "2"]
        return [len(ids) / 10 for ids in completion_ids]

    total = compute_rewards([numeric_match, length_bonus], ["p", "p"], ["1", "3"], [[5], [6, 7]],
                            answer=["1", "2"])
    assert total == pytest.approx([1.1, 0.2])
    assert resolve_reward("nreft_engine.train.rewards:numeric_match") is numeric_match
    with pytest.raises(ValueError, match="unknown reward 'bogus'"):
        resolve_reward("bogus")
