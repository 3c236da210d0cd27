"""Synthetic long-context recall tasks generated locally from a seed, following HELMET and RULER.

- ``json_kv`` (HELMET, from "Lost in the Middle"): a JSON object of random UUID -> UUID pairs; the model
  must return the value of one key. 105 / 220 / 440 / 900 / 1800 pairs at 8K / 16K / 32K / 64K / 128K
  are HELMET's counts for Llama-3's tokenizer; here the count is fitted to the model's tokenizer so the
  prompt hits the target length. Metric: substring exact match.
- RULER needle-in-a-haystack variants, needle "One of the special magic {kind} for {key} is: {value}.":
  ``niah_single`` (one needle in RULER's repeated-sentence "noise" haystack), ``niah_multikey`` (three
  distractor needles with other keys), ``niah_uuid`` (a haystack made of UUID -> UUID needles, RULER's
  niah_multikey_3), ``niah_multivalue`` (four values for the same key, all must be recalled),
  ``variable_tracking`` (a chain of ``VAR X = ...`` assignments; all names assigned the value must be
  listed). Metric: RULER's recall (share of the gold strings found in the output).

The queried needle's depth is swept evenly over the context (0% .. 100%) across a length's samples. The
haystack is sized by bisection on whole sentences (or KV pairs / needles) so the prompt, as the model
sees it, is at most the target length and within 2% of it whenever one such unit is below 2% of the
target (always so for Llama-3's tokenizer at 8K and beyond).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HELMET_KV_PAIRS = {8192: 105, 16384: 220, 32768: 440, 65536: 900, 131072: 1800}
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
_WORDS = ["apple", "river", "candle", "mountain", "violet", "harbor", "pepper", "glacier", "lantern", "meadow",
          "falcon", "marble", "orchard", "thunder", "velvet", "compass", "saffron", "cobalt", "willow", "ember"]


@dataclass
class Example:
    task: str
    length: int  # the target prompt length in tokens
    index: int
    prompt: str  # exactly what the model reads (chat template applied when use_chat_template)
    answers: list[str]
    max_new_tokens: int
    metric: str
    use_chat_template: bool
    tokens: int = 0  # the prompt's length in the model's tokens
    depth: float | None = None  # where the queried needle sits, 0..1
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Parts:
    """A prompt before sizing: ``render(units)`` gives the user text for the first ``units`` haystack units."""

    render: Callable[[int], str]
    answer_prefix: str
    answers: list[str]
    max_units: int
    meta: dict[str, Any] = field(default_factory=dict)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _insert(haystack: list[str], needles: list[tuple[float, str]]) -> str:
    """Haystack sentences with each needle placed before the sentence at its depth (0..1)."""
    out = list(haystack)
    for depth, needle in sorted(needles, key=lambda x: -x[0]):  # deepest first keeps earlier indices valid
        out.insert(round(depth * len(haystack)), needle)
    return " ".join(out)


def _noise(n: int) -> list[str]:
    return [NOISE[i % len(NOISE)] for i in range(n)]


_NIAH_PREFIX = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the {kind} afterwards.\n")
_NIAH_QUESTION = "\nWhat are all the special magic {kind} for {key} mentioned in the provided text?"
_NIAH_ANSWER = "The special magic {kind} for {key} mentioned in the provided text are"


def _niah(rng: random.Random, depth: float, kind: str, keys: list[str], values: list[list[str]],
          haystack_units: Callable[[int], list[str]], max_units: int) -> _Parts:
    """Needles ``values[i]`` for ``keys[i]``; key 0 is asked, its first needle at ``depth``, the rest random."""
    needles = []
    for i, (key, vals) in enumerate(zip(keys, values)):
        for j, value in enumerate(vals):
            d = depth if (i, j) == (0, 0) else rng.random()
            needles.append((d, f"One of the special magic {kind} for {key} is: {value}."))

    def render(units: int) -> str:
        return (_NIAH_PREFIX.format(kind=kind) + _insert(haystack_units(units), needles)
                + _NIAH_QUESTION.format(kind=kind, key=keys[0]))

    return _Parts(render, _NIAH_ANSWER.format(kind=kind, key=keys[0]), list(values[0]), max_units)


def niah_single(rng: random.Random, depth: float, length: int) -> _Parts:
    return _niah(rng, depth, "numbers", [rng.choice(_WORDS)], [[_number(rng)]], _noise, length)


def niah_multikey(rng: random.Random, depth: float, length: int) -> _Parts:
    keys = rng.sample(_WORDS, 4)
    return _niah(rng, depth, "numbers", keys, [[_number(rng)] for _ in keys], _noise, length)


def niah_multivalue(rng: random.Random, depth: float, length: int) -> _Parts:
    return _niah(rng, depth, "numbers", [rng.choice(_WORDS)], [[_number(rng) for _ in range(4)]], _noise, length)


def niah_uuid(rng: random.Random, depth: float, length: int) -> _Parts:
    key, value = _uuid(rng), _uuid(rng)
    pool = [f"One of the special magic uuids for {_uuid(rng)} is: {_uuid(rng)}." for _ in range(length // 8 + 1)]
    return _niah(rng, depth, "uuids", [key], [[value]], lambda n: pool[:n], len(pool))


def variable_tracking(rng: random.Random, depth: float, length: int) -> _Parts:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    positions = [(i + 0.5) / len(chain) for i in range(len(chain))]  # in order, spread over the context

    def render(units: int) -> str:
        return ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                + _insert(_noise(units), list(zip(positions, chain)))
                + f"\nQuestion: Find all variables that are assigned the value {value} in the text above.")

    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
              f"are assigned the value {value}, they are:")
    return _Parts(render, prefix, names, length)


def json_kv(rng: random.Random, depth: float, length: int) -> _Parts:
    pool = [(_uuid(rng), _uuid(rng)) for _ in range(length // 16 + 2)]

    def pairs(units: int) -> list[tuple[str, str]]:
        units = max(units, 1)
        target = min(round(depth * (units - 1)), units - 1)
        return [pool[0] if i == target else pool[i + 1 if i < target else i] for i in range(units)]

    def render(units: int) -> str:
        kv = pairs(units)
        demos = "".join(f"Key: \"{k}\"\nCorresponding value: {v}\n\n" for k, v in [p for p in kv if p != pool[0]][:2])
        return (f"JSON data:\n{json.dumps(dict(kv), indent=1)}\n\nExtract the value corresponding to the specified "
                f"key in the JSON object below.\n\n{demos}Key: \"{pool[0][0]}\"")

    return _Parts(render, "Corresponding value:", [pool[0][1]], len(pool) - 1,
                  meta={"helmet_pairs": HELMET_KV_PAIRS.get(length)})


TASKS: dict[str, tuple[Callable[[random.Random, float, int], _Parts], str, int, bool]] = {
    # name: (generator, metric, max new tokens, chat template by default: HELMET's recall configs use none)
    "json_kv": (json_kv, "substring_exact_match", 100, False),
    "niah_single": (niah_single, "recall", 50, False),
    "niah_multikey": (niah_multikey, "recall", 50, False),
    "niah_uuid": (niah_uuid, "recall", 100, False),
    "niah_multivalue": (niah_multivalue, "recall", 80, False),
    "variable_tracking": (variable_tracking, "recall", 50, False),
}


def render_prompt(tokenizer: Any, user: str, answer_prefix: str, chat: bool) -> str:
    """The text the model reads: the chat template around the question when ``chat``, else BOS + text;
    the answer prefix opens the model's reply either way (as in HELMET)."""
    if chat:
        head = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        return head + answer_prefix
    return (tokenizer.bos_token or "") + user + "\n" + answer_prefix


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit(tokenizer: Any, parts: _Parts, length: int, chat: bool) -> tuple[str, int]:
    """The largest haystack whose prompt is at most ``length`` tokens (bisection on whole units)."""
    lo, hi = 0, parts.max_units
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        prompt = render_prompt(tokenizer, parts.render(mid), parts.answer_prefix, chat)
        n = count_tokens(tokenizer, prompt)
        if n <= length:
            best, lo = (prompt, n), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"target length {length} is shorter than the task's fixed text")
    return best


def generate(task: str, length: int, samples: int, tokenizer: Any, seed: int = 42,
             use_chat_template: bool | None = None) -> list[Example]:
    """``samples`` examples of ``task`` at ``length`` tokens, needle depths evenly swept over 0..1."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}, ppl")
    make, metric, max_new, chat_default = TASKS[task]
    chat = chat_default if use_chat_template is None else use_chat_template
    out = []
    for i in range(samples):
        rng = random.Random(f"{seed}-{task}-{length}-{i}")
        depth = i / (samples - 1) if samples > 1 else 0.5
        parts = make(rng, depth, length)
        prompt, n = _fit(tokenizer, parts, length, chat)
        out.append(Example(task, length, i, prompt, parts.answers, max_new, metric, chat, n,
                           None if task == "variable_tracking" else depth, parts.meta))
    return out
