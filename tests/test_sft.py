"""SFT stage: Llama-3 chat format, assistant-only loss, exact packing, MDS import, multi-process, saved model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import torchrun
from mds_writer import write_mds

from megaprolong.sft.run import COMPLETE

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "mds"

# Meta's template from Meta-Llama-3-8B-Instruct's tokenizer_config.json: ours must render the same text.
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What does the model do with a book?"},
        {"role": "assistant", "content": "The model reads a book.  "},
        {"role": "user", "content": " And the optimizer?"},
        {"role": "assistant", "content": "The optimizer averages the gradients."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    from megaprolong.sft.chat import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer))


@pytest.fixture(scope="module")
def chat_model(tiny_chat_model):
    return tiny_chat_model


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    from megaprolong.data.tiny import synthetic_chats, write_jsonl

    return write_jsonl(synthetic_chats(60, seed=1), tmp_path_factory.mktemp("chats") / "chats.jsonl")


def test_template_renders_meta_llama3_format(tokenizer):
    for prompt in (False, True):
        ours = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        meta = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt,
                                             chat_template=META_LLAMA3_TEMPLATE)
        assert ours == meta


def _llama_turns(text: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """``text`` followed by Llama-3 turns written by hand, and the character spans of the trained replies."""
    spans = []
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        start = len(text)
        text += m["content"].strip() + "<|eot_id|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
    return text, spans


def test_only_assistant_replies_and_their_eot_carry_loss(tokenizer):
    from megaprolong.sft.chat import IGNORE, tokenize_conversation

    # The expected text, built by hand from the Llama-3 format, with the character spans that must be trained.
    text, spans = _llama_turns("<|begin_of_text|>", CHAT)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    ids, labels = tokenize_conversation(tokenizer, CHAT)
    assert ids == enc["input_ids"]
    assert [label != IGNORE for label in labels] == expected
    assert all(label == t for label, t in zip(labels, ids) if label != IGNORE)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    trained_eots = [t for t, label in zip(ids, labels) if label == eot]
    assert len(trained_eots) == 2  # each reply's end-of-turn token, not the user's or system's


def _llama31_reference(messages):
    """Llama-3.1's rendering by hand (Meta's template without tools) and the character spans trained."""
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    return _llama_turns("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                        f"December 2023\nToday Date: 26 Jul 2024\n\n{system}<|eot_id|>", rest)


def _chatml_reference(messages, default_system):
    """Qwen's ChatML by hand: the reply and its <|im_end|> trained, the newline after it not."""
    text, spans = "", []
    if default_system and messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"] + "<|im_end|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


@pytest.mark.parametrize("chat_format", ["llama3.1", "qwen2.5", "chatml"])
@pytest.mark.parametrize("with_system", [True, False])
def test_family_chat_formats_train_exactly_the_replies(tiny_tokenizer, chat_format, with_system):
    from transformers import AutoTokenizer

    from megaprolong.sft.chat import IGNORE, QWEN25_SYSTEM, prepare_tokenizer, tokenize_conversation

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    if chat_format != "llama3.1":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok = prepare_tokenizer(tok, chat_format)
    messages = CHAT if with_system else CHAT[1:]
    if chat_format == "llama3.1":
        text, spans = _llama31_reference(messages)
    else:
        text, spans = _chatml_reference(messages, QWEN25_SYSTEM if chat_format == "qwen2.5" else None)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    ids, labels = tokenize_conversation(tok, messages)
    assert ids == enc["input_ids"]
    assert [label != IGNORE for label in labels] == expected
    end = tok.convert_tokens_to_ids("<|eot_id|>" if chat_format == "llama3.1" else "<|im_end|>")
    assert tok.eos_token_id == end and sum(label == end for label in labels) == 2  # each reply's end of turn
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|end_header_id|>\n\n" if chat_format == "llama3.1"
                                                     else "<|im_start|>assistant\n")


def test_chat_format_follows_the_model_family():
    from megaprolong.sft.chat import chat_format_for

    assert chat_format_for({"model_type": "llama", "rope_parameters": {"rope_type": "default"}}) == "llama3"
    assert chat_format_for({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}) == "llama3.1"
    assert chat_format_for({"model_type": "qwen2"}) == "qwen2.5"
    assert chat_format_for({"model_type": "qwen3"}) == "chatml"


def test_bad_conversations_are_counted_or_strict_errors(tmp_path, tokenizer):
    from megaprolong.data.readers import DataError
    from megaprolong.sft.data import DataReport, read_conversations

    good = {"messages": CHAT[1:3]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": CHAT[:2]}),
             json.dumps({"messages": [{"role": "robot", "content": "hi"}, CHAT[2]]}),
             json.dumps({"messages": [CHAT[1], {"role": "assistant", "content": "  "}]}),
             json.dumps({"text": "no messages"}), json.dumps(good)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = DataReport()
    assert len(list(read_conversations(path, tokenizer, report=report))) == 2
    assert report.skipped == {"malformed": 2, "no assistant turn": 1, "unknown role": 1, "empty content": 1}
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        list(read_conversations(path, tokenizer, strict=True))
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": CHAT[:2]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: no assistant turn"):
        list(read_conversations(path, tokenizer, strict=True))


def test_parquet_and_saved_hf_datasets_read_like_jsonl(tmp_path, chats, tokenizer):
    import datasets

    from megaprolong.sft.data import read_conversations

    rows = [json.loads(line) for line in Path(chats).read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chats.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    expected = [(c.input_ids, c.labels) for c in read_conversations(chats, tokenizer)]
    for source in (tmp_path / "chats.parquet", tmp_path / "saved"):
        assert [(c.input_ids, c.labels) for c in read_conversations(source, tokenizer)] == expected


def test_a_folder_of_splits_trains_on_one_split_only(tmp_path, chats, tokenizer):
    """UltraChat's data/ folder holds train_sft, test_sft, train_gen and test_gen shards: only train_sft is
    read by default; a folder of train and test reads train; an explicit data.split is honoured; several
    splits and no rule to choose are refused, naming them; so is a saved DatasetDict's."""
    import datasets

    from megaprolong.data.readers import DataError
    from megaprolong.sft.data import chat_files, read_conversations

    rows = [json.loads(line) for line in Path(chats).read_text().splitlines()]
    ultrachat = tmp_path / "ultrachat_200k" / "data"
    ultrachat.mkdir(parents=True)
    parts = {"train_sft": rows[:30], "test_sft": rows[30:40], "train_gen": rows[40:50], "test_gen": rows[50:]}
    for split, part in parts.items():
        for shard, chunk in enumerate((part[: len(part) // 2], part[len(part) // 2:])):
            datasets.Dataset.from_list(chunk).to_parquet(str(ultrachat / f"{split}-{shard:05d}-of-00002-a3ecf927.parquet"))

    def read(path, split=None):
        return [(c.input_ids, c.labels) for c in read_conversations(path, tokenizer, split=split)]

    def expected(part):
        (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        return read(tmp_path / "one.jsonl")

    files, split = chat_files(ultrachat)
    assert split == "train_sft" and [f.name[:9] for f in files] == ["train_sft", "train_sft"]
    assert read(ultrachat) == expected(parts["train_sft"])
    assert read(ultrachat, split="test_gen") == expected(parts["test_gen"])
    plain = tmp_path / "plain"  # a folder per split
    for split, part in (("train", rows[:20]), ("test", rows[20:])):
        (plain / split).mkdir(parents=True)
        (plain / split / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    assert read(plain) == expected(rows[:20])
    odd = tmp_path / "odd"
    odd.mkdir()
    for split in ("validation", "test"):
        (odd / f"{split}.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match=r"holds several splits \(test, validation\): name the one to train on"):
        chat_files(odd)
    with pytest.raises(DataError, match="data.split='train': no such split here"):
        chat_files(odd, "train")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:5]),
                          "dev": datasets.Dataset.from_list(rows[5:10])}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="several splits"):
        read(tmp_path / "dict")
    assert read(tmp_path / "dict", split="dev") == expected(rows[5:10])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fsdp_wraps_each_familys_own_decoder_layer(tmp_path, family):
    """FSDP (GPU only, so its settings are what is tested here) wraps the model's own decoder layers."""
    from transformers import AutoConfig

    from megaprolong.sft.config import SFTConfig
    from megaprolong.sft.run import fsdp_settings

    AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    want = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "qwen3": "Qwen3DecoderLayer"}[family]
    assert fsdp_settings(SFTConfig(model=str(tmp_path)))["transformer_layer_cls_to_wrap"] == [want]


def test_packing_starts_a_new_sequence_when_a_conversation_does_not_fit():
    from megaprolong.sft.chat import IGNORE
    from megaprolong.sft.data import Conversation, DataReport, plan_packing, truncate

    assert plan_packing([3, 4, 2, 5, 1, 6], seq_length=8) == [[0, 1], [2, 3, 4], [5]]
    report = DataReport()
    long = Conversation(list(range(12)), [IGNORE] * 3 + list(range(3, 12)))
    assert truncate(long, 8, report).input_ids == list(range(8)) and report.truncated == 1
    late = Conversation(list(range(12)), [IGNORE] * 10 + [10, 11])
    assert truncate(late, 8, report) is None and report.skipped["no trained tokens after truncation"] == 1


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_batch_equals_separate_conversations(chat_model, tokenizer):
    """Loss and gradients of a packed row (TRL's padding-free collator, position ids restarting per
    conversation) equal the token-weighted result of running each conversation alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from megaprolong.sft.chat import IGNORE, tokenize_conversation

    convs = [tokenize_conversation(tokenizer, c) for c in (CHAT, CHAT[1:3], CHAT[3:])]
    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32, attn_implementation="sdpa",
                                                 use_cache=False)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    row = {"input_ids": sum((i for i, _ in convs), []), "labels": sum((lab for _, lab in convs), []),
           "seq_lengths": [len(i) for i, _ in convs]}
    packed_loss, packed_grads = _loss_and_grads(model, collate([row]))
    total = sum(sum(label != IGNORE for label in lab[1:]) for _, lab in convs)
    loss, grads = 0.0, {n: torch.zeros_like(g) for n, g in packed_grads.items()}
    for ids, lab in convs:
        n = sum(label != IGNORE for label in lab[1:])
        l, g = _loss_and_grads(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([lab])})
        loss += l * n / total
        for k in grads:
            grads[k] += g[k] * n / total
    torch.testing.assert_close(packed_loss, loss, rtol=1e-6, atol=1e-6)
    for k in grads:
        torch.testing.assert_close(packed_grads[k], grads[k], rtol=1e-5, atol=1e-7)
    # And without restarting positions the conversations would see each other: the test can tell.
    plain = collate([{k: v for k, v in row.items() if k != "seq_lengths"}])
    assert not torch.allclose(_loss_and_grads(model, plain)[0], packed_loss, atol=1e-4)


def test_test_mds_writer_matches_mosaicml_streaming(tmp_path):
    from megaprolong.data.mds import read_mds

    samples = [s for _, s in read_mds(FIXTURES / "sft_raw")]
    index = json.loads((FIXTURES / "sft_raw" / "index.json").read_text())["shards"][0]
    columns = dict(zip(index["column_names"], index["column_encodings"]))
    write_mds(tmp_path, columns, samples)
    assert (tmp_path / "shard.00000.mds").read_bytes() == (FIXTURES / "sft_raw" / "shard.00000.mds").read_bytes()


def _config(chat_model, out, **data):
    from megaprolong.sft.config import SFTConfig, SFTDataConfig, SFTTrainConfig

    return SFTConfig(model=str(chat_model), output_dir=str(out), data=SFTDataConfig(**data),
                     train=SFTTrainConfig(seq_length=128, global_batch_tokens=512, steps=3, precision="fp32",
                                          gradient_checkpointing=False))


def test_mds_import_equals_the_jsonl_path(tmp_path, chats, chat_model, tokenizer):
    """ProLong-layout shards (tokens, document indices, loss mask) of the same conversations give the same
    packed training rows as tokenizing the chat file."""
    from megaprolong.sft.chat import IGNORE
    from megaprolong.sft.data import build_sft_dataset, read_conversations

    convs = list(read_conversations(chats, tokenizer))
    samples = []
    for i in range(0, len(convs), 7):  # several conversations per MDS sample, as in prolong-ultrachat-64K
        group = convs[i:i + 7]
        bounds = np.cumsum([0] + [len(c.input_ids) for c in group])
        samples.append({"input_ids": np.concatenate([c.input_ids for c in group]).astype(np.uint32),
                        "indices": np.stack([bounds[:-1], bounds[1:]], 1).astype(np.uint32),
                        "mask": np.concatenate([[lab != IGNORE for lab in c.labels] for c in group]).astype(np.uint8)})
    write_mds(tmp_path / "mds", {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "mask": "ndarray:uint8"},
              samples)
    from_jsonl, r1 = build_sft_dataset(_config(chat_model, tmp_path, path=str(chats)), tokenizer, tmp_path / "c1", False)
    from_mds, r2 = build_sft_dataset(_config(chat_model, tmp_path, mds=str(tmp_path / "mds")), tokenizer,
                                     tmp_path / "c2", False)
    assert len(from_jsonl) == len(from_mds) == r1.sequences > 1
    assert from_jsonl.to_dict() == from_mds.to_dict()
    assert (r1.conversations, r1.tokens, r1.trained_tokens) == (r2.conversations, r2.tokens, r2.trained_tokens)
    assert max(sum(s) for s in from_jsonl["seq_lengths"]) <= 128


def _sft(nproc: int, chat_model, chats, out: Path, *extra: str) -> list[dict]:
    args = ["--config", str(REPO / "examples" / "tiny_sft.yaml"), f"model={chat_model}", f"output_dir={out}",
            f"data.path={chats}", "train.seq_length=128", "train.global_batch_tokens=512", "train.steps=3", *extra]
    if nproc > 1:
        stdout = torchrun("megaprolong.sft", nproc, *args, timeout=300)
    else:
        proc = subprocess.run([sys.executable, "-m", "megaprolong.sft", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        stdout = proc.stdout
    assert "outlives the run" not in stdout  # the wrapped model freed before the process group goes
    wanted = next((a.split("=", 1)[1] for a in extra if a.startswith("train.attn_implementation=")), "sdpa")
    line = next(line for line in stdout.splitlines() if "[sft r0] attention " in line)
    assert f"[sft r0] attention {wanted}" in line and line.endswith("chat format llama3"), line
    if wanted == "megaprolong_varlen":  # our kernel checked itself first
        assert "(cpu-blockwise; self-test passed, max error" in line, line
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multirank
def test_two_processes_equal_one_and_the_model_reloads(tmp_path, chat_model, chats, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    one = _sft(1, chat_model, chats, tmp_path / "one")  # sdpa: the dense per-conversation mask
    # two ranks through our registered varlen attention (the blockwise kernel on the CPU, no mask)
    two = _sft(2, chat_model, chats, tmp_path / "two", "train.attn_implementation=megaprolong_varlen")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    w1, w2 = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "two"))
    w0 = AutoModelForCausalLM.from_pretrained(chat_model).state_dict()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)  # it trained

    # The saved model reloads in transformers (no missing keys), keeps the RoPE base, and generates.
    saved = tmp_path / "one" / "model"
    model, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(1.28e8)
    tok = AutoTokenizer.from_pretrained(saved)
    prompt = tok.apply_chat_template(CHAT[1:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")


def test_cli_refuses_bad_config(tmp_path, chat_model, chats):
    def sft(*args):
        return subprocess.run([sys.executable, "-m", "megaprolong.sft", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)

    out = sft("--config", str(REPO / "examples" / "tiny_sft.yaml"), f"model={chat_model}", f"data.path={chats}",
              "train.global_batch_tokens=1000")
    assert out.returncode == 2 and "train.global_batch_tokens=1000 is not a multiple of train.seq_length" in out.stderr
    out = sft("--config", str(REPO / "examples" / "tiny_sft.yaml"), f"model={tmp_path / 'nope'}")
    assert out.returncode == 2 and "not an HF model folder" in out.stderr
    assert sft("--help").returncode == 0


@pytest.mark.multirank
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, chat_model, chats):
    """Two ranks, as on a node (a rank's device is then ``cpu:N`` for transformers: before 5.18 its optimizer
    state could not be loaded there)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = ["--config", str(REPO / "examples" / "tiny_sft.yaml"), f"model={chat_model}", f"output_dir={out}",
            f"data.path={chats}", "train.seq_length=128", "train.global_batch_tokens=512", "train.steps=6",
            "train.save_steps=3"]

    def sft():
        return torchrun("megaprolong.sft", 2, *args, timeout=300)

    sft()
    full = load_file(out / "model" / "model.safetensors")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert all((ckpts / c / COMPLETE).exists() for c in ("checkpoint-3", "checkpoint-6"))
    # checkpoint-6 damaged after it was saved (one byte in the middle: same size, only its digest tells);
    # checkpoint-9 as a save that a killed worker left half-written
    optimizer = ckpts / "checkpoint-6" / "optimizer.pt"
    damaged = bytearray(optimizer.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(damaged))
    shutil.copytree(ckpts / "checkpoint-3", ckpts / "checkpoint-9")
    (ckpts / "checkpoint-9" / COMPLETE).unlink()
    shutil.rmtree(out / "model")
    log = sft()
    assert f"skipping checkpoint {ckpts / 'checkpoint-9'}: no {COMPLETE}" in log
    assert f"skipping checkpoint {ckpts / 'checkpoint-6'}: {optimizer}: content changed" in log
    assert f"resuming from {ckpts / 'checkpoint-3'}" in log
    resumed = load_file(out / "model" / "model.safetensors")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once: the resumed run rewrote 4..6
    assert [r["loss"] for r in rows] == losses
    assert "[sft r0] step     6/6 | loss" in log and " tok/s | mem " in log
