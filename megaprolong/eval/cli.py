"""``megaprolong-eval``: evaluate an HF checkpoint; ``compare`` two runs; drive the full HELMET suite."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megaprolong.config import ConfigError, from_dict, load_config

USAGE = """megaprolong-eval --model DIR --tasks TASKS --lengths N,N,... --out DIR [options]
       megaprolong-eval compare RUN_A RUN_B
       megaprolong-eval helmet --helmet-dir DIR --model DIR --lengths N,... --out DIR [--run]"""


def _csv(cast):
    return lambda s: [cast(x) for x in s.split(",") if x]


def _run_parser() -> argparse.ArgumentParser:
    from megaprolong.eval.tasks import TASKS

    p = argparse.ArgumentParser(prog="megaprolong-eval", usage=USAGE, description=(
        "Evaluate an HF checkpoint offline on long-context tasks generated locally with a fixed seed "
        f"(HELMET's JSON KV and RULER's needle-in-a-haystack variants: {', '.join(TASKS)}) and on long-document "
        "perplexity by position (task ppl). Writes OUT/results.json, predictions.jsonl, table.txt, scores.png "
        "and ppl.png, and prints the task x length table."))
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    p.add_argument("--model", help="HF model folder (megaprolong-sft or megaprolong-convert output)")
    p.add_argument("--tasks", type=_csv(str), help=f"comma-separated: {', '.join(TASKS)}, ppl (default: all but ppl)")
    p.add_argument("--lengths", type=_csv(int), help="prompt lengths in tokens (default: 8192,...,131072)")
    p.add_argument("--out", help="output folder (must not exist unless --force)")
    p.add_argument("--backend", choices=["transformers", "vllm"], help="inference engine (default: transformers)")
    p.add_argument("--tp", type=int, help="tensor parallel size for vLLM")
    p.add_argument("--samples", type=int, help="examples per task and length; needle depth swept over them (10)")
    p.add_argument("--seed", type=int, help="seed of the task generator (42)")
    p.add_argument("--chat-template", choices=["auto", "on", "off"],
                   help="wrap prompts in the model's chat template; auto: per task as HELMET (recall: off)")
    p.add_argument("--ppl-data", help="indexed dataset PREFIX of held-out long documents for task ppl")
    p.add_argument("--ppl-documents", type=int, help="documents scored per length (8)")
    p.add_argument("--ppl-chunk", type=int, help="tokens per forward pass when scoring (4096): bounds memory")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    return p


def _run(argv: list[str]) -> int:
    from megaprolong.eval.run import EvalConfig, run_eval, table

    args = _run_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "config" and v is not None and v is not False}
    try:
        cfg = load_config(EvalConfig, args.config)
        cfg = from_dict(EvalConfig, {**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, **given})
        results = run_eval(cfg)
    except (ConfigError, ValueError) as e:
        print(f"megaprolong-eval: {e}", file=sys.stderr)
        return 2
    print(table(results))
    print(f"megaprolong-eval: results -> {cfg.out}/results.json ({results['seconds']:.0f} s)")
    return 0


def _compare(argv: list[str]) -> int:
    from megaprolong.eval.run import compare, load_results

    p = argparse.ArgumentParser(prog="megaprolong-eval compare", description="Score differences of two runs.")
    p.add_argument("run_a")
    p.add_argument("run_b")
    args = p.parse_args(argv)
    try:
        print(compare(load_results(args.run_a), load_results(args.run_b), args.run_a, args.run_b))
    except ConfigError as e:
        print(f"megaprolong-eval: {e}", file=sys.stderr)
        return 2
    return 0


def _helmet(argv: list[str]) -> int:
    from megaprolong.eval import helmet
    from megaprolong.eval.run import table

    p = argparse.ArgumentParser(prog="megaprolong-eval helmet", description=(
        "Run the full HELMET suite (a checkout with its data, --helmet-dir) on our model: write its configs at "
        "the requested lengths to OUT/configs, run its eval.py (--run), collect the scores into OUT/results.json "
        "and the same table as our own tasks."))
    p.add_argument("--helmet-dir", required=True, type=Path, help="HELMET checkout (eval.py, configs/, data/)")
    p.add_argument("--model", help="HF model folder (needed unless --collect-only)")
    p.add_argument("--lengths", type=_csv(int), default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="override HELMET's per-config use_chat_template")
    p.add_argument("--run", action="store_true", help="run HELMET's eval.py on the configs (else print commands)")
    p.add_argument("--collect-only", action="store_true", help="only collect results already in OUT/output")
    args = p.parse_args(argv)
    try:
        if not args.collect_only:
            if not args.model:
                raise ConfigError("--model is required unless --collect-only")
            chat = {"auto": None, "on": True, "off": False}[args.chat_template]
            configs = helmet.write_configs(args.helmet_dir, args.model, args.lengths, args.out, chat)
            if not args.run:
                for c in configs:
                    print(f"cd {args.helmet_dir} && python eval.py --config {c.resolve()}")
                return 0
            helmet.run(args.helmet_dir, configs)
        results = helmet.collect(args.out / "configs", args.out / "output")
    except ConfigError as e:
        print(f"megaprolong-eval: {e}", file=sys.stderr)
        return 2
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    if results["missing"]:
        print(f"megaprolong-eval: no HELMET output for {', '.join(results['missing'])}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare(argv[1:])
    if argv and argv[0] == "helmet":
        return _helmet(argv[1:])
    return _run(argv)
