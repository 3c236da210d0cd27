"""Llama-3 chat format with assistant-only loss: the template, conversation checks, tokenization.

The template renders exactly what Meta's Llama-3-Instruct template renders (the tests compare them), with
``{% generation %}`` markers around each assistant reply and its ``<|eot_id|>``, so transformers'
``return_assistant_tokens_mask`` tells which tokens carry loss.
"""

from __future__ import annotations

from typing import Any

from megaprolong.config import ConfigError

# Meta's Llama-3 Instruct format; generation markers added around what the assistant must learn to write.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
ROLES = ("system", "user", "assistant")
IGNORE = -100


class ConversationError(ValueError):
    """A conversation that cannot be trained on; ``reason`` is the short name used in the skip summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give ``tokenizer`` the Llama-3 chat template with generation markers, ``<|eot_id|>`` as the end of a
    reply, and a pad token (never trained on: padding-free batches have none in their loss)."""
    missing = [t for t in LLAMA3_SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ConfigError(f"tokenizer lacks Llama-3 chat tokens {missing}: not a Llama-3 tokenizer")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.eos_token = "<|eot_id|>"  # what Llama-3-Instruct stops generating on
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_messages(messages: Any) -> list[dict]:
    """The conversation if it is trainable, else :class:`ConversationError` naming why."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("malformed", "messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConversationError("malformed", f"message {i} is not {{'role': str, 'content': str}}")
        if m["role"] not in ROLES:
            raise ConversationError("unknown role", f"message {i} has role {m['role']!r}; known: {', '.join(ROLES)}")
        if not m["content"].strip():
            raise ConversationError("empty content", f"message {i} ({m['role']}) is empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_conversation(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are the token ids on assistant replies and their ``<|eot_id|>``,
    ``IGNORE`` elsewhere."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), out["assistant_masks"]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]
