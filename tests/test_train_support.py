"""Helpers for the training tests: a character-level tokenizer with a chat template, sized for tiny models."""

from __future__ import annotations

import string

from tiny_models import make_tiny_model
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from nreft_engine.train.config import TrainConfig
from nreft_engine.train.data import arithmetic_task
from nreft_engine.train.loop import Trainer

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny models' pad / bos / eos
CHARS = string.digits + string.ascii_letters + " +-*=?.,#:\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (77 of them after 3 specials: fits the tiny models' vocab of 128)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_policy(seed: int = 0, **overrides):
    """A tiny random Llama and the character tokenizer that fits it."""
    return make_tiny_model("llama", seed=seed, **overrides), char_tokenizer()


def test_char_tokenizer_round_trips():
    tok = char_tokenizer()
    text = "3 + 4 = 7\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def token_reward(prompts, completions, completion_ids, **columns):
    """A reward that varies across any random completions (a hash of the token ids), for loop tests."""
    return [(sum(ids) * 31 % 11) / 10 for ids in completion_ids]


def tiny_trainer(out_dir, seed=0, steps=4, task=None, **overrides):
    """A Trainer of the tiny policy: 2 arithmetic prompts x 4 samples per step, a checkpoint every 2 steps."""
    model, tok = tiny_policy(seed=seed)
    settings = {"steps": steps, "prompts_per_step": 2, "group_size": 4, "max_tokens": 5, "eval_max_tokens": 5,
                "lr": 3e-3, "temperature": 1.0, "skip_ratio": 0.25, "protect_first": 1, "protect_last": 1,
                "save_every": 2, "skip_importance": False}
    cfg = TrainConfig(**{**settings, **overrides})
    return Trainer(model, tok, task or arithmetic_task(0, num_heldout=8), [token_reward], token_reward, cfg,
                   str(out_dir), f"tiny-{seed}", kv_cache_memory=2**24)
