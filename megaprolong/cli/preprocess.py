"""``megaprolong-preprocess``: raw corpora to Megatron indexed datasets (logic in megaprolong.data)."""

from __future__ import annotations

import argparse
import json
import sys

from megaprolong.data.preprocess import PreprocessConfig, mpi_world_size, preprocess, preprocess_mpi
from megaprolong.data.readers import DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="megaprolong-preprocess",
        description="Tokenize raw documents into PREFIX.bin/.idx (one sequence per document, input order) "
                    "plus PREFIX.json (counts, drops by reason, tokenizer hash, timing). By default no BOS/EOS "
                    "is added and nothing is dropped. `megaprolong-preprocess inspect PREFIX` summarizes a dataset.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files: .jsonl, .jsonl.gz, .jsonl.zst or .parquet (read in the order given), or "
                        "MDS directories (ProLong's released data: token ids kept, samples split into documents)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory or tokenizer.json file")
    p.add_argument("--output-prefix", required=True, help="write PREFIX.bin, PREFIX.idx and PREFIX.json")
    p.add_argument("--text-key", default="text", help="field holding the document text (default: text)")
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS token to every document")
    p.add_argument("--add-eos", action="store_true", help="append the tokenizer's EOS token to every document")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="drop documents shorter than N tokens (ProLong's long data: 65536)")
    p.add_argument("--group-by", metavar="KEY",
                   help="concatenate all documents sharing this field (e.g. a repository name), in input order, "
                        "before filtering")
    p.add_argument("--group-separator", default="\n\n", help="text placed between grouped documents")
    p.add_argument("--domain", help="MDS inputs: keep only samples whose domain column equals this")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer threads on this node; across nodes run under mpirun (mpi extra): each rank "
                        "takes a contiguous run of the input files, rank 0 merges")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records (counted in PREFIX.json) instead of stopping with an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def inspect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megaprolong-preprocess inspect",
                                description="Print documents, tokens and a length histogram of indexed datasets.")
    p.add_argument("prefix", nargs="+", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    a = p.parse_args(argv)
    from megaprolong.data.check import check_indexed
    from megaprolong.data.inspect import describe

    for prefix in a.prefix:
        problems = check_indexed(prefix)
        for problem in problems:
            print(f"megaprolong-preprocess inspect: {problem}", file=sys.stderr)
        if problems:
            return 2
        try:
            print(describe(prefix))
        except (FileNotFoundError, OSError, ValueError) as e:
            print(f"megaprolong-preprocess inspect: {prefix}: cannot open ({e})", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        return inspect_main(argv[1:])
    a = parse_args(argv)
    cfg = PreprocessConfig(inputs=a.input, tokenizer=a.tokenizer, output_prefix=a.output_prefix,
                           text_key=a.text_key, add_bos=a.add_bos, add_eos=a.add_eos, min_tokens=a.min_tokens,
                           group_by=a.group_by, group_separator=a.group_separator, domain=a.domain, workers=a.workers,
                           skip_bad=a.skip_bad, quiet=a.quiet)
    try:
        report = preprocess_mpi(cfg) if mpi_world_size() > 1 else preprocess(cfg)
    except DataError as e:
        print(f"megaprolong-preprocess: error: {e}", file=sys.stderr)
        return 1
    if report is not None and not a.quiet:
        print(json.dumps({k: report[k] for k in ("documents", "tokens", "dropped", "elapsed_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
