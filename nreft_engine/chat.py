"""Chat-template prompts: one user turn (after an optional system turn), ready for the assistant's reply.

`nreft generate`, `nreft bench` and the trainer all build their prompts here, so they agree token for token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    """Whether there is a tokenizer and it defines a chat template."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None = None) -> str:
    """The chat template applied to (`system`, if not None, and) `user`, ending with the generation prompt."""
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None = None) -> list[int]:
    """Token ids of `chat_text`, adding no special tokens (the template writes its own).

    The same ids as `apply_chat_template(..., tokenize=True)`, which also encodes the rendered text this way.
    """
    return tokenizer.encode(chat_text(tokenizer, user, system), add_special_tokens=False)
