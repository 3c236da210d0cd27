"""``megaprolong-eval``: evaluate an HF checkpoint; ``compare`` two runs; drive the full HELMET suite."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megaprolong.config import ConfigError, from_dict, load_config
from megaprolong.runtime.log import get_logger

USAGE = """megaprolong-eval --model DIR --tasks TASKS --lengths N,N,... --out DIR [options]
       megaprolong-eval short --model DIR --out DIR [--tasks hellaswag,mmlu,...] [--include-path DIR] [options]
       megaprolong-eval report MODEL_RESULTS... [--base MODEL_RESULTS] [--out DIR]
       megaprolong-eval compare RUN_A RUN_B
       megaprolong-eval helmet --helmet-dir DIR --model DIR --python HELMET_PY --lengths N,... --out DIR --run"""


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
    get_logger("eval").info(f"results -> {cfg.out}/results.json ({results['seconds']:.0f} s)")
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


def _shots(text: str) -> dict[str, int]:
    out = {}
    for item in text.split(","):
        task, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--shots: expected TASK=N[,TASK=N...], got {item!r}")
        out[task.strip()] = int(n)
    return out


def _short(argv: list[str]) -> int:
    from megaprolong.eval.short import PROLONG_TASKS, ShortConfig, run_short, table

    p = argparse.ArgumentParser(prog="megaprolong-eval short", description=(
        "Short-context tasks through EleutherAI's lm-evaluation-harness (the optional extra lmeval) on an HF "
        "model folder: ProLong's five by default, any lm_eval task or group name, or your own task YAMLs "
        "(--include-path). Every task's data is loaded before anything runs: a task whose dataset cannot be had "
        "stops the run, naming it, and nothing is written. Writes OUT/results.json (lm_eval's metric names and "
        "standard errors, and what was used), OUT/table.txt, OUT/short.png."))
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--tasks", type=_csv(str), default=list(PROLONG_TASKS),
                   help=f"comma-separated lm_eval task names (default: {','.join(PROLONG_TASKS)})")
    p.add_argument("--shots", type=_shots, default={},
                   help="few-shot examples per task, TASK=N,... (default: " +
                        ", ".join(f"{t} {n}" for t, n in PROLONG_TASKS.items()) + "; other tasks: their own)")
    p.add_argument("--include-path", help="a folder of your own lm_eval task YAMLs (lm_eval's option)")
    p.add_argument("--data-dir", help="an HF cache folder (HF_HOME) holding the tasks' datasets: used offline "
                                      "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE are set)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="lm_eval's model type (vllm where installed)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    p.add_argument("--dtype", default="auto", help="weights' dtype: auto (the checkpoint's), bfloat16, float32, ...")
    p.add_argument("--device", help="cuda:0, cpu, ... (default: CUDA when present)")
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size")
    p.add_argument("--limit", type=int, help="at most this many examples per task (a quick check, not comparable)")
    p.add_argument("--seed", type=int, default=1234, help="lm_eval's random seeds (few-shot sampling)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    args = p.parse_args(argv)
    cfg = ShortConfig(**{k: v for k, v in vars(args).items()})
    try:
        results = run_short(cfg)
    except ConfigError as e:
        print(f"megaprolong-eval short: {e}", file=sys.stderr)
        return 2
    print(table(results))
    get_logger("eval").info(f"results -> {cfg.out}/results.json ({results['seconds']:.0f} s)")
    return 0


def _report(argv: list[str]) -> int:
    from megaprolong.eval import report

    p = argparse.ArgumentParser(prog="megaprolong-eval report", description=(
        "The table ProLong reports: per model, HELMET's categories averaged over the lengths run, their average, "
        "the short-context tasks and their average, and the difference from a base model. A model is a folder "
        "holding any of our results.json files (long tasks and ppl, the HELMET adapter's, the short suite's)."))
    p.add_argument("models", nargs="+", help="one folder of results per model")
    p.add_argument("--base", help="the base model's folder of results: each row also shows its difference")
    p.add_argument("--lengths", type=_csv(int), default=list(report.LENGTHS),
                   help="the HELMET lengths averaged (default: ProLong's 32768,65536,131072)")
    p.add_argument("--out", type=Path, help="also write OUT/report.json, report.txt, report.png")
    args = p.parse_args(argv)
    try:
        rep = report.report(args.models, args.base, tuple(args.lengths))
    except ConfigError as e:
        print(f"megaprolong-eval report: {e}", file=sys.stderr)
        return 2
    print(report.text(rep))
    if args.out:
        report.write(rep, args.out)
    return 0


def _helmet(argv: list[str]) -> int:
    from megaprolong.eval import helmet

    p = argparse.ArgumentParser(prog="megaprolong-eval helmet", description=(
        "Run the full HELMET suite (a checkout with its data, --helmet-dir) on our model with HELMET's own "
        "interpreter (--python): write its configs at the requested lengths to OUT/configs, run its eval.py "
        "(sdpa attention where flash-attn is absent; the CPU settings HELMET needs on a machine without GPU), "
        "check that every dataset produced its output, and report HELMET's scores, category averages and overall "
        "figure in OUT/results.json and a table. Outputs go to OUT/output/<model>-<hash>: one folder per model."))
    p.add_argument("--helmet-dir", required=True, type=Path, help="HELMET checkout (eval.py, configs/, data/)")
    p.add_argument("--model", required=True, help="HF model folder (its path also names its output folder)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter of HELMET's environment (default: this one); its imports are checked first")
    p.add_argument("--lengths", type=_csv(int), default=[8192, 16384, 32768, 65536, 131072],
                   help="input lengths to run (HELMET's configs: 8192 ... 131072)")
    p.add_argument("--categories", type=_csv(str), default=list(helmet.CATEGORIES),
                   help=f"comma-separated HELMET categories (default all: {','.join(helmet.CATEGORIES)})")
    p.add_argument("--max-test-samples", type=int, help="examples per dataset (default: each HELMET config's)")
    p.add_argument("--out", required=True, type=Path, help="output folder (configs/, output/, logs/, results.json)")
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="override HELMET's per-config use_chat_template (auto: keep it)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="cpu: HELMET's no_cuda/no_torch_compile/no_bf16 settings (auto: when no GPU is visible)")
    p.add_argument("--overwrite", action="store_true", help="rerun datasets whose output exists (HELMET skips them)")
    p.add_argument("--allow-partial", action="store_true",
                   help="exit 0 with a table marked partial when datasets have no output (default: exit 1)")
    p.add_argument("--run", action="store_true", help="run HELMET's eval.py on the configs (else print commands)")
    p.add_argument("--collect-only", action="store_true", help="only collect results already in OUT/output")
    args = p.parse_args(argv)
    failures: list[str] = []
    try:
        model = helmet.check_model_path(args.model)
        entries = helmet.helmet_entries(args.helmet_dir, args.lengths, args.categories)
        configs = sorted((args.out / "configs").glob("*.yaml")) if args.collect_only else []
        if not args.collect_only:
            chat = {"auto": None, "on": True, "off": False}[args.chat_template]
            cpu = args.device == "cpu" or (args.device == "auto" and not _cuda())
            configs = helmet.write_configs(args.helmet_dir, model, entries, args.out, use_chat_template=chat,
                                           max_test_samples=args.max_test_samples, cpu=cpu, overwrite=args.overwrite)
            launcher = f"{args.python} {helmet.LAUNCHER}"
            if not args.run:
                for c in configs:
                    print(f"cd {args.helmet_dir} && {launcher} --config {c.resolve()}")
                return 0
            helmet.check_python(args.helmet_dir, args.python)
            note = helmet.hub_note(entries)
            if note:
                print(f"megaprolong-eval helmet: {note}", file=sys.stderr)
            failures = helmet.run(args.helmet_dir, args.python, configs, args.out)
        found = helmet.collect(helmet.configured_entries(configs), helmet.model_output_dir(args.out, model), model)
    except ConfigError as e:
        print(f"megaprolong-eval: {e}", file=sys.stderr)
        return 2
    partial = bool(failures or found.missing)
    results = helmet.results_dict(found, model, partial)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(helmet.table(results))
    for failure in failures or [f"{m}: no HELMET output" for m in found.missing]:
        print(f"megaprolong-eval helmet: {failure}", file=sys.stderr)
    if partial and not args.allow_partial:
        print("megaprolong-eval helmet: datasets without output (above); --allow-partial to accept a partial table",
              file=sys.stderr)
        return 1
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare(argv[1:])
    if argv and argv[0] == "short":
        return _short(argv[1:])
    if argv and argv[0] == "report":
        return _report(argv[1:])
    if argv and argv[0] == "helmet":
        return _helmet(argv[1:])
    return _run(argv)
