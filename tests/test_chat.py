"""Chat-template prompts: one helper for `nreft generate`, `nreft bench` and the trainer, token for token."""

import pytest
from test_train_support import char_tokenizer

from nreft_engine.bench import QUESTIONS, chat_workload
from nreft_engine.chat import chat_prompt_ids, chat_text, has_chat_template
from nreft_engine.train.data import INSTRUCTION, arithmetic_task, render_prompts


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What transformers itself tokenizes for the messages (bench's workload was defined this way)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def test_chat_text_renders_an_optional_system_turn_and_the_generation_prompt():
    tok = char_tokenizer()
    assert chat_text(tok, "2 + 3 = ?") == "u:2 + 3 = ?\na:"
    assert chat_text(tok, "2 + 3 = ?", system="Be brief.") == "s:Be brief.\nu:2 + 3 = ?\na:"
    assert chat_text(tok, "x", system="") == "s:\nu:x\na:"  # an empty system turn is still a turn


def test_chat_prompt_ids_are_the_templates_own_tokenization():
    tok = char_tokenizer()
    ids = chat_prompt_ids(tok, "7 - 4 = ?", "Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 - 4 = ?"}]
    assert ids == _template_ids(tok, messages)
    assert tok.decode(ids) == "s:Be brief.\nu:7 - 4 = ?\na:"


def test_has_chat_template():
    tok = char_tokenizer()
    assert has_chat_template(tok)
    tok.chat_template = None
    assert not has_chat_template(tok) and not has_chat_template(None)


@pytest.mark.slow
def test_bench_and_train_prompts_on_smollm2_match_the_templates_tokenization(smollm):
    _, tok = smollm
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(20)]  # cycled past the end
    assert chat_workload(tok, 20) == [_template_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    problems = arithmetic_task(0).heldout[:20]
    system = {"role": "system", "content": INSTRUCTION}
    expected = [_template_ids(tok, [system, {"role": "user", "content": p.question}]) for p in problems]
    assert render_prompts(tok, problems) == expected
