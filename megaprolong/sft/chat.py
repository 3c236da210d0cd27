"""Chat formats with assistant-only loss: the templates, conversation checks, tokenization.

Each template renders what its model family's own template renders for plain conversations (no tools):
Llama-3 (Meta's Llama-3-Instruct), Llama-3.1 (its system header with the knowledge and today dates), and
ChatML (Qwen2.5, with its default system prompt; Qwen3, without, and without thinking blocks). Each marks
every assistant reply and its end-of-turn token with ``{% generation %}``, so transformers'
``return_assistant_tokens_mask`` tells which tokens carry loss. The fine-tuned model is saved with the
template it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megaprolong.config import ConfigError

# Meta's Llama-3 turns; generation markers added around what the assistant must learn to write.
_LLAMA3_TURNS = (
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
# Meta's Llama-3 Instruct format
LLAMA3_CHAT_TEMPLATE = "{{ bos_token }}" + _LLAMA3_TURNS
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Meta's Llama-3.1 template without tools: a system turn always, opening with the two date lines.
LLAMA31_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if not date_string is defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: ' "
    "+ date_string + '\n\n' + system_message + '<|eot_id|>' }}"
) + _LLAMA3_TURNS


def _chatml_template(default_system: str | None) -> str:
    """ChatML as Qwen renders it; the reply and its ``<|im_end|>`` are trained, the newline after it is not."""
    system = ("{% if messages[0]['role'] != 'system' %}"
              f"{{{{ '<|im_start|>system\n{default_system}<|im_end|>\n' }}}}{{% endif %}}") if default_system else ""
    return (
        system +
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}"
        "{{ message['content'] + '<|im_end|>\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str
    special_tokens: tuple[str, ...]  # the tokenizer must have them
    bos: str | None  # set as the tokenizer's bos_token (None: the template writes none)
    end_of_reply: str  # the tokenizer's eos_token: what generation stops on


CHAT_FORMATS = {f.name: f for f in (
    ChatFormat("llama3", LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS, "<|begin_of_text|>", "<|eot_id|>"),
    ChatFormat("llama3.1", LLAMA31_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS, "<|begin_of_text|>", "<|eot_id|>"),
    ChatFormat("qwen2.5", _chatml_template(QWEN25_SYSTEM), CHATML_SPECIAL_TOKENS, None, "<|im_end|>"),
    ChatFormat("chatml", _chatml_template(None), CHATML_SPECIAL_TOKENS, None, "<|im_end|>"),
)}


def chat_format_for(model_config: dict) -> str:
    """The chat format of an HF model's family: ChatML for Qwen (Qwen2.5's with its default system prompt),
    Llama-3.1's for a Llama with Llama-3 RoPE scaling (3.1 / 3.2 / 3.3), else Llama-3's."""
    kind = model_config.get("model_type")
    if kind == "qwen2":
        return "qwen2.5"
    if kind == "qwen3":
        return "chatml"
    rope = model_config.get("rope_scaling") or model_config.get("rope_parameters") or {}
    return "llama3.1" if rope.get("rope_type") == "llama3" else "llama3"
ROLES = ("system", "user", "assistant")
IGNORE = -100


class ConversationError(ValueError):
    """A conversation that cannot be trained on; ``reason`` is the short name used in the skip summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


def prepare_tokenizer(tokenizer: Any, chat_format: str = "llama3") -> Any:
    """Give ``tokenizer`` the chat template of ``chat_format`` with generation markers, its end-of-reply token
    as ``eos_token``, and a pad token (never trained on: padding-free batches have none in their loss)."""
    if chat_format not in CHAT_FORMATS:
        raise ConfigError(f"chat_format={chat_format!r}: expected one of {', '.join(CHAT_FORMATS)}")
    fmt = CHAT_FORMATS[chat_format]
    missing = [t for t in fmt.special_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ConfigError(f"tokenizer lacks the {chat_format} chat tokens {missing}: not a tokenizer of that family "
                          f"(set chat_format)")
    tokenizer.chat_template = fmt.template
    if fmt.bos:
        tokenizer.bos_token = fmt.bos
    tokenizer.eos_token = fmt.end_of_reply  # what the instruct model stops generating on
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
    """(input_ids, labels): labels are the token ids on assistant replies and their end-of-turn token,
    ``IGNORE`` elsewhere."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), out["assistant_masks"]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]
