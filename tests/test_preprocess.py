"""Raw text -> .bin/.idx: exact token ids, every input format, bad input, atomic output."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from megaprolong.data.preprocess import PreprocessConfig, preprocess
from megaprolong.data.readers import DataError
from megaprolong.data.tiny import write_jsonl


def run(tmp_path, tok, inputs, **kw):
    prefix = tmp_path / "out" / "ds"
    report = preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], tokenizer=str(tok),
                                         output_prefix=str(prefix), quiet=True, **kw))
    return prefix, report


def expected_ids(tok_dir, texts):
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def documents(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_round_trip_equals_tokenizers(tmp_path, tiny_corpus, tiny_tokenizer):
    src = write_jsonl(tiny_corpus, tmp_path / "in.jsonl")
    prefix, report = run(tmp_path, tiny_tokenizer, [src])
    assert documents(prefix) == expected_ids(tiny_tokenizer, [d["text"] for d in tiny_corpus])
    assert report["documents"] == len(tiny_corpus) and report["dropped"] == {}
    assert IndexedDataset(str(prefix)).index.dtype == np.uint16  # vocab < 65,500
    meta = json.loads(prefix.with_suffix(".json").read_text())
    assert meta["tokens"] == sum(map(len, documents(prefix))) and len(meta["tokenizer_sha256"]) == 64


def test_gz_zst_parquet_equal_plain(tmp_path, tiny_corpus, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    plain = write_jsonl(tiny_corpus, tmp_path / "in.jsonl")
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    zst = tmp_path / "in.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(tiny_corpus), parquet)
    want = expected_ids(tiny_tokenizer, [d["text"] for d in tiny_corpus])
    for src in (gz, zst, parquet):
        prefix, _ = run(tmp_path, tiny_tokenizer, [src])
        assert documents(prefix) == want, src.name


def test_bos_eos_min_tokens_group_by(tmp_path, tiny_tokenizer):
    docs = [{"text": "def a(x): return x", "repo": "r1"}, {"text": "hello", "repo": "r2"},
            {"text": "def b(y): return y", "repo": "r1"}]
    src = write_jsonl(docs, tmp_path / "in.jsonl")
    tok = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    prefix, _ = run(tmp_path, tiny_tokenizer, [src], add_bos=True, add_eos=True)
    assert documents(prefix)[1] == [bos] + expected_ids(tiny_tokenizer, ["hello"])[0] + [eos]

    prefix, report = run(tmp_path, tiny_tokenizer, [src], group_by="repo", group_separator="\n#\n")
    assert documents(prefix) == expected_ids(tiny_tokenizer, [docs[0]["text"] + "\n#\n" + docs[2]["text"], "hello"])

    n_hello = len(expected_ids(tiny_tokenizer, ["hello"])[0])
    prefix, report = run(tmp_path, tiny_tokenizer, [src], group_by="repo", min_tokens=n_hello + 1)
    assert len(documents(prefix)) == 1 and report["dropped"] == {"min_tokens": 1}


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "broken\n', r"in\.jsonl:2: malformed JSON"),
    (b'{"text": "ok"}\n{"other": 1}\n', r"in\.jsonl:2: missing text key 'text'"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"in\.jsonl:2: not valid UTF-8"),
    (b'[1, 2]\n', r"in\.jsonl:1: expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, tiny_tokenizer, content, message):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    with pytest.raises(DataError, match=message):
        run(tmp_path, tiny_tokenizer, [src])
    assert not list((tmp_path / "out").iterdir()), "nothing half-written is left behind"
    prefix, report = run(tmp_path, tiny_tokenizer, [src], skip_bad=True)
    assert report["dropped"] == {"bad_record": 1}
    assert report["documents"] == (0 if content.startswith(b"[") else 1)


def test_truncated_gz_and_missing_paths(tmp_path, tiny_corpus, tiny_tokenizer):
    plain = write_jsonl(tiny_corpus, tmp_path / "in.jsonl")
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes())[:-200])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: truncated or corrupt"):
        run(tmp_path, tiny_tokenizer, [gz])
    import zstandard

    whole = zstandard.ZstdCompressor().compress(plain.read_bytes())
    zst = tmp_path / "cut.jsonl.zst"
    for cut in (len(whole) // 2, len(whole) - 3):  # mid-stream, and inside the frame's last bytes
        zst.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=r"cut\.jsonl\.zst:\d+: truncated or corrupt"):
            run(tmp_path, tiny_tokenizer, [zst])
    with pytest.raises(DataError, match="tokenizer not found"):
        run(tmp_path, tmp_path / "no-tokenizer", [plain])
    with pytest.raises(DataError, match="does not exist"):
        run(tmp_path, tiny_tokenizer, [tmp_path / "missing.jsonl"])


def test_cli_exit_code_and_message(tmp_path, tiny_tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "ok"}\nnot json\n')
    out = subprocess.run([sys.executable, "-m", "megaprolong.cli.preprocess", "--input", str(src), "--tokenizer",
                          str(tiny_tokenizer), "--output-prefix", str(tmp_path / "o" / "x"), "--quiet"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "in.jsonl:2: malformed JSON" in out.stderr


def test_fast_tokenizer_is_used_only_when_it_agrees(tmp_path, tiny_corpus, tiny_tokenizer, monkeypatch, capsys):
    src = write_jsonl(tiny_corpus, tmp_path / "in.jsonl")
    want = expected_ids(tiny_tokenizer, [d["text"] for d in tiny_corpus])
    _, report = run(tmp_path, tiny_tokenizer, [src])
    assert report["tokenizer_backend"] == "gigatoken"
    import gigatoken

    real = gigatoken.Tokenizer.encode_batch_list
    monkeypatch.setattr(gigatoken.Tokenizer, "encode_batch_list",
                        lambda self, texts: [ids[:-1] for ids in real(self, texts)])  # a wrong fast tokenizer
    prefix, report = run(tmp_path, tiny_tokenizer, [src])
    assert report["tokenizer_backend"] == "tokenizers"
    assert "disagrees" in capsys.readouterr().err
    assert documents(prefix) == want


def test_lone_surrogate_names_the_record(tmp_path, tiny_tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=r"in\.jsonl:2: text cannot be tokenized"):
        run(tmp_path, tiny_tokenizer, [src])
    prefix, report = run(tmp_path, tiny_tokenizer, [src], skip_bad=True)
    assert report["dropped"] == {"bad_record": 1}
    assert documents(prefix) == expected_ids(tiny_tokenizer, ["fine", "also fine"])


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "mds"


def big_vocab_tokenizer(tmp_path):
    """A tokenizer with Llama-3's vocabulary size (ids of the MDS fixtures go up to 128,255)."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128256)}, unk_token="t0"))
    d = tmp_path / "bigtok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("name", ["pretrain_zstd", "sft_raw"])
def test_mds_import_keeps_ids_and_splits_documents(tmp_path, name):
    docs = json.loads((FIXTURES / name / "documents.json").read_text())
    prefix, report = run(tmp_path, big_vocab_tokenizer(tmp_path), [FIXTURES / name])
    assert documents(prefix) == [d["ids"] for d in docs]
    assert IndexedDataset(str(prefix)).index.dtype == np.int32  # vocab >= 65,500


def test_mds_domain_filter(tmp_path):
    docs = json.loads((FIXTURES / "pretrain_zstd" / "documents.json").read_text())
    prefix, _ = run(tmp_path, big_vocab_tokenizer(tmp_path), [FIXTURES / "pretrain_zstd"], domain="book-65536")
    assert documents(prefix) == [d["ids"] for d in docs if d["domain"] == "book-65536"]


def test_corrupt_mds_shard(tmp_path):
    import shutil

    bad = tmp_path / "mds"
    shutil.copytree(FIXTURES / "sft_raw", bad)
    shard = bad / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(DataError, match=r"shard\.00000\.mds: corrupt MDS shard"):
        run(tmp_path, big_vocab_tokenizer(tmp_path), [bad])


def test_kill_9_never_leaves_a_valid_pair(tmp_path, tiny_tokenizer):
    import os
    import signal
    import time

    src = tmp_path / "big.jsonl"
    line = json.dumps({"text": "Every document packs the tokens of a long story. " * 40}) + "\n"
    src.write_text(line * 20000)  # ~40 MB
    prefix = tmp_path / "out" / "ds"
    cmd = [sys.executable, "-m", "megaprolong.cli.preprocess", "--input", str(src), "--tokenizer", str(tiny_tokenizer),
           "--output-prefix", str(prefix), "--quiet"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 60
    while not list(prefix.parent.glob(".ds.tmp*.bin")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not prefix.with_suffix(".idx").exists()
    with pytest.raises(Exception):
        IndexedDataset(str(prefix))


def test_inspect_prints_counts_and_histogram(tmp_path, tiny_corpus, tiny_tokenizer):
    from megaprolong.data.inspect import length_histogram

    src = write_jsonl(tiny_corpus, tmp_path / "in.jsonl")
    prefix, report = run(tmp_path, tiny_tokenizer, [src])
    out = subprocess.run([sys.executable, "-m", "megaprolong.cli.preprocess", "inspect", str(prefix)],
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert f"{report['documents']:,} documents, {report['tokens']:,} tokens" in out.stdout
    rows = length_histogram(np.array([1, 2, 3, 4, 100]))
    assert rows == [(1, 1, 1, 1), (2, 3, 2, 5), (4, 7, 1, 4), (64, 127, 1, 100)]


def test_mpirun_two_ranks_equals_one_rank(tmp_path, tiny_corpus, tiny_tokenizer):
    import os
    import shutil

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (tools/setup_test_env.sh installs Open MPI where it can)")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install -e .[mpi])")
    inputs = [write_jsonl(tiny_corpus[i::3], tmp_path / f"part{i}.jsonl") for i in range(3)]
    single, report1 = run(tmp_path, tiny_tokenizer, inputs)
    prefix = tmp_path / "mpi" / "ds"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,tcp",
               OMPI_MCA_plm_rsh_agent="false")
    out = subprocess.run(["mpirun", "-n", "2", "--oversubscribe", sys.executable, "-m", "megaprolong.cli.preprocess",
                          "--input", *map(str, inputs), "--tokenizer", str(tiny_tokenizer),
                          "--output-prefix", str(prefix), "--quiet"], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert documents(prefix) == documents(single)
    meta = json.loads(prefix.with_suffix(".json").read_text())
    assert meta["ranks"] == 2 and meta["documents"] == report1["documents"] and meta["tokens"] == report1["tokens"]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["ds.bin", "ds.idx", "ds.json"]  # partials removed


def test_cli_writes_index_in_a_child_process(tmp_path, tiny_corpus, tiny_tokenizer):
    """The CLI does not import megatron-core itself; the .idx its child writes opens in megatron."""
    src = write_jsonl(tiny_corpus, tmp_path / "in.jsonl")
    prefix = tmp_path / "cli" / "ds"
    out = subprocess.run([sys.executable, "-m", "megaprolong.cli.preprocess", "--input", str(src), "--tokenizer",
                          str(tiny_tokenizer), "--output-prefix", str(prefix), "--add-eos"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["documents"] == len(tiny_corpus)
    eos = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json")).token_to_id("<|end_of_text|>")
    assert documents(prefix) == [ids + [eos] for ids in expected_ids(tiny_tokenizer, [d["text"] for d in tiny_corpus])]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["ds.bin", "ds.idx", "ds.json"]


def test_group_by_spills_to_disk_and_equals_the_in_memory_grouping(tmp_path, tiny_tokenizer, monkeypatch):
    """Groups spread over the whole input, spilled into several buckets: the same documents as joining
    each key's texts in input order, groups in order of first appearance; no spill file is left."""
    import random

    from megaprolong.data import grouping

    rng = random.Random(0)
    docs = [{"text": f"doc {i} " + "x" * rng.randint(0, 40), "repo": f"r{rng.randint(0, 60)}"} for i in range(600)]
    src = write_jsonl(docs, tmp_path / "in.jsonl")
    reference: dict[str, list[str]] = {}
    for d in docs:
        reference.setdefault(d["repo"], []).append(d["text"])
    want = expected_ids(tiny_tokenizer, ["\n#\n".join(texts) for texts in reference.values()])
    monkeypatch.setattr(grouping, "BUCKET_TARGET_BYTES", 1000)  # ~30 KB of input: many buckets
    assert grouping.bucket_count(src.stat().st_size) > 8
    prefix, _ = run(tmp_path, tiny_tokenizer, [src], group_by="repo", group_separator="\n#\n")
    assert documents(prefix) == want
    assert not list(tmp_path.rglob("*.groups*")), "spill folder left behind"
