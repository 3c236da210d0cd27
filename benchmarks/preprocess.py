"""Preprocessing speed and memory: jsonl on disk -> .bin/.idx on disk, end to end.

Generates a corpus (default 200 MB) of Zipf-distributed synthetic words, trains a 50K byte-level BPE
tokenizer on a slice of it (HF tokenizers), then runs `megaprolong-preprocess` as a separate process per
configuration and prints wall time, tokens/s, MB/s and the process's peak RSS. Every document carries a
``repo`` key drawn uniformly from 2,000 (so every group is spread over the whole input); ``--group-by``
also measures ``--group-by repo``, whose peak RSS should not grow with the input. Run:

    .venv/bin/python benchmarks/preprocess.py [--mb 200] [--workdir DIR] [--group-by]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from _measure import run_measured


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    if path.exists() and path.stat().st_size >= megabytes * 1e6:
        return
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(60000)]
    words += ["def", "return", "(", ")", ":", "\n", "    ", "=", "+", ".", ",", "the", "of", "and"]
    words = np.array(words)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        written = 0
        while written < megabytes * 1e6:
            n = int(rng.integers(50, 3000))
            ids = np.minimum(rng.zipf(1.2, size=n) - 1, len(words) - 1)
            line = json.dumps({"text": " ".join(words[ids]), "repo": f"repo{rng.integers(2000)}"}) + "\n"
            f.write(line)
            written += len(line)
    tmp.replace(path)


def make_tokenizer(corpus: Path, out: Path, vocab: int = 50000) -> Path:
    if (out / "tokenizer.json").exists():
        return out
    from megaprolong.data.tiny import train_tokenizer

    texts = []
    with open(corpus) as f:
        for _, line in zip(range(4000), f):
            texts.append(json.loads(line)["text"])
    train_tokenizer(texts, out, vocab_size=vocab)
    return out


def run(name: str, corpus: Path, tokenizer: Path, prefix: Path, env_extra: dict, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "megaprolong.cli.preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer),
           "--output-prefix", str(prefix), "--workers", str(os.cpu_count()), "--quiet", *extra]
    wall, peak = run_measured(cmd, Path(__file__).resolve().parent.parent, env_extra)
    report = json.loads(prefix.with_suffix(".json").read_text())
    mb = corpus.stat().st_size / 1e6
    return {"config": name, "backend": report["tokenizer_backend"], "MB": mb, "docs": report["documents"],
            "tokens": report["tokens"], "wall_s": wall, "tok_per_s": report["tokens"] / wall,
            "MB_per_s": mb / wall, "peak_rss_MiB": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, nargs="+", default=[200], help="corpus sizes in MB")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "megaprolong-bench"))
    ap.add_argument("--skip-slow", action="store_true", help="only the gigatoken path")
    ap.add_argument("--group-by", action="store_true", help="also --group-by repo (2,000 groups over the input)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in args.mb:
        corpus = work / f"corpus_{mb}mb_repo.jsonl"
        make_corpus(corpus, mb)
        tok = make_tokenizer(work / f"corpus_{args.mb[0]}mb_repo.jsonl" if mb != args.mb[0] else corpus, work / "tok50k")
        rows.append(run("megaprolong (gigatoken)", corpus, tok, work / f"out_fast_{mb}", {}))
        if args.group_by:
            rows.append(run("megaprolong --group-by repo", corpus, tok, work / f"out_group_{mb}", {},
                            "--group-by", "repo"))
        if not args.skip_slow:
            # Same pipeline with the fast tokenizer made unavailable: HF tokenizers' batch encoder.
            rows.append(run("megaprolong (HF tokenizers)", corpus, tok, work / f"out_hf_{mb}",
                            {"MEGAPROLONG_DISABLE_FAST_TOKENIZER": "1"}))
    print(f"\n{'config':<28} {'backend':<11} {'MB':>7} {'docs':>8} {'tokens':>12} {'wall s':>8} "
          f"{'M tok/s':>8} {'MB/s':>7} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['config']:<28} {r['backend']:<11} {r['MB']:>7.0f} {r['docs']:>8,} {r['tokens']:>12,} "
              f"{r['wall_s']:>8.1f} {r['tok_per_s'] / 1e6:>8.2f} {r['MB_per_s']:>7.1f} {r['peak_rss_MiB']:>13.0f}")


if __name__ == "__main__":
    main()
