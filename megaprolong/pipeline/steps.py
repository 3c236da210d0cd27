"""The pipeline's steps: what each reads and makes, when its output is complete, and how it runs (here, or
as a Slurm job of the existing sbatch scripts).

A step is complete only when its output verifies: datasets readable and consistent with their index, a
conversion's record, a stage's final (portable) checkpoint at the recipe's last step with all its files,
the HF export's weights, SFT's final model, the evaluation report. Boundaries are checked, not assumed:
stage N+1 starts from stage N's final portable checkpoint, named by its step; the data of every set was
made with the pipeline's tokenizer (the hash preprocessing records), which is the one the HF export takes;
an SFT chat format set by hand must match the model's family.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from megaprolong.config import ConfigError, load_config
from megaprolong.pipeline.config import TINY_RAW, PipelineConfig

REPO = Path(__file__).resolve().parents[2]
TINY_DOMAINS = ("books", "code", "web")


@dataclass
class Step:
    name: str
    kind: str  # python (run by this module), train, sft, eval
    needs: list[str]  # steps whose outputs it reads
    reads: list[str]  # inputs, for plan
    makes: list[str]  # outputs, for plan
    nodes: int = 1
    env: dict = field(default_factory=dict)  # the sbatch script's settings (train, sft, eval)
    args: list[str] = field(default_factory=list)  # the command's arguments (train, sft: key=value overrides)


class Pipeline:
    """The steps of a :class:`PipelineConfig` and the folders they use."""

    def __init__(self, cfg: PipelineConfig, path: str | Path):
        self.cfg, self.path, self.root = cfg, Path(path).resolve(), Path(cfg.root)
        problems = self.structure_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def structure_problems(self) -> list[str]:
        """Steps that cannot connect whatever is on disk: unknown data sets, suites, a missing SFT input."""
        c, problems = self.cfg, []
        for stage in c.stages:
            if stage.data not in c.data:
                problems.append(f"stage {stage.name}: data {stage.data!r} is not one of the data sets "
                                f"({', '.join(c.data) or 'none'})")
        if len({s.name for s in c.stages}) != len(c.stages):
            problems.append("stages: two stages share a name (each is a folder ROOT/ckpt/NAME)")
        if c.sft and bool(c.sft.data) == bool(c.sft.mds):
            problems.append("sft: set exactly one of data (chat data) and mds (ProLong's tokenized shards)")
        if c.eval:
            unknown = [s for s in c.eval.suites if s not in ("long", "short", "helmet")]
            if unknown:
                problems.append(f"eval.suites: unknown {', '.join(unknown)} (expected long, short, helmet)")
            if "helmet" in c.eval.suites and not c.eval.helmet_dir:
                problems.append("eval.suites has helmet: set eval.helmet_dir (a HELMET checkout)")
            if c.eval.ppl_data and "/" not in c.eval.ppl_data:
                problems.append(f"eval.ppl_data={c.eval.ppl_data}: SET/PREFIX of the pipeline's data, or a PREFIX path")
        if c.stages and not c.tokenizer:
            problems.append("no tokenizer: set base_model (its tokenizer) or tokenizer")
        return problems

    # ---- the layout ----
    def data_dir(self, name: str) -> Path:
        return self.root / "data" / name

    def stage_dir(self, name: str) -> Path:
        return self.root / "ckpt" / name

    @property
    def base_dir(self) -> Path:
        return self.root / "ckpt" / "base"

    @property
    def hf_dir(self) -> Path:
        return self.root / "hf"

    @property
    def sft_dir(self) -> Path:
        return self.root / "sft"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def raw_dir(self) -> Path:
        return self.root / TINY_RAW

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def stage_config(self, i: int):
        from megaprolong.training.config import Config

        stage = self.cfg.stages[i]
        return load_config(Config, stage.recipe, stage.overrides)

    def final_checkpoint(self, i: int) -> Path:
        """Stage ``i``'s last checkpoint: the portable one the next stage starts from."""
        return self.stage_dir(self.cfg.stages[i].name) / f"step_{self.stage_config(i).train.steps:08d}"

    def stage_mix(self, i: int) -> str:
        stage = self.cfg.stages[i]
        return stage.mix or self.cfg.data[stage.data].mix

    # ---- the steps ----
    def steps(self) -> list[Step]:
        c, out = self.cfg, []
        if c.prepare == "tiny":
            out.append(Step("tiny-data", "python", [], ["(generated from a seed)"], [str(self.raw_dir)]))
        for name, data in c.data.items():
            out.append(Step(f"data:{name}", "python", ["tiny-data"] if c.prepare == "tiny" else [],
                            [p for d in data.domains.values() for p in d.input] + [c.tokenizer or "?"],
                            [str(self.data_dir(name) / prefix) for prefix in data.domains]))
        if c.base_model:
            out.append(Step("base", "python", [], [c.base_model], [str(self.base_dir)]))
        for i, stage in enumerate(c.stages):
            init = None if i == 0 and not c.base_model else str(self.base_dir) if i == 0 else \
                str(self.final_checkpoint(i - 1))
            needs = [f"data:{stage.data}"] + (["base"] if i == 0 and c.base_model else [])
            needs += [c.stages[i - 1].name] if i else []
            run = str(self.stage_dir(stage.name))
            # data.root and checkpoint.load travel as DATA_ROOT and INIT_CKPT (the stage script's settings)
            args = [f"data.mix={self.stage_mix(i)}", "data.prepare=null", *stage.overrides]
            out.append(Step(stage.name, "train", needs, [stage.recipe, str(self.data_dir(stage.data))] + ([init] if init else []),
                            [run], stage.nodes,
                            {"RECIPE": stage.recipe, "CKPT_DIR": run, "DATA_ROOT": str(self.data_dir(stage.data)),
                             **({"INIT_CKPT": init} if init else {})}, args))
        if c.stages:
            out.append(Step("hf", "python", [c.stages[-1].name], [str(self.final_checkpoint(len(c.stages) - 1))],
                            [str(self.hf_dir)]))
        if c.sft:
            data = {"SFT_MDS": c.sft.mds} if c.sft.mds else {"SFT_DATA": c.sft.data}
            args = [f"model={self.hf_dir}", f"output_dir={self.sft_dir}",
                    f"data.mds={c.sft.mds}" if c.sft.mds else f"data.path={c.sft.data}",
                    "data.path=null" if c.sft.mds else "data.mds=null", "data.prepare=null", *c.sft.overrides]
            out.append(Step("sft", "sft", ["hf"] + (["tiny-data"] if c.prepare == "tiny" else []),
                            [str(self.hf_dir), c.sft.mds or c.sft.data], [str(self.sft_dir)], c.sft.nodes,
                            {"RECIPE": c.sft.recipe, "MODEL": str(self.hf_dir), "OUT_DIR": str(self.sft_dir), **data},
                            args))
        if c.eval:
            model = self.sft_dir / "model" if c.sft else self.hf_dir
            out.append(Step("eval", "eval", ["sft" if c.sft else "hf"], [str(model)], [str(self.eval_dir)],
                            1, self.eval_env(model)))
        return out

    def eval_env(self, model: Path) -> dict:
        e = self.cfg.eval
        env = {"MODEL": str(model), "OUT_DIR": str(self.eval_dir), "SUITES": ",".join(e.suites),
               "LENGTHS": ",".join(map(str, e.lengths)), "REPORT_LENGTHS": ",".join(map(str, e.report_lengths)),
               "EVAL_ARGS": " ".join(e.args), "SHORT_ARGS": " ".join(e.short_args)}
        if e.tasks:
            env["TASKS"] = ",".join(e.tasks)
        if e.short_tasks:
            env["SHORT_TASKS"] = ",".join(e.short_tasks)
        if e.ppl_data:
            env["PPL_DATA"] = self.ppl_prefix()
        if e.base_results:
            env["BASE_RESULTS"] = e.base_results
        if e.helmet_dir:
            env.update(HELMET_DIR=e.helmet_dir, HELMET_PYTHON=e.helmet_python or "", HELMET_ARGS=" ".join(e.helmet_args))
        return env

    def ppl_prefix(self) -> str:
        """eval.ppl_data as a dataset prefix: SET/PREFIX names one of the pipeline's datasets."""
        p = self.cfg.eval.ppl_data
        head, _, tail = p.partition("/")
        return str(self.data_dir(head) / tail) if head in self.cfg.data else p

    # ---- is a step's output complete? ----
    def incomplete(self, step: Step) -> str | None:
        """Why ``step``'s output is not complete (None: it is, and it verifies)."""
        if step.name == "tiny-data":
            need = [self.raw_dir / f"{d}.jsonl" for d in TINY_DOMAINS] + [self.raw_dir / "chats.jsonl",
                                                                         self.raw_dir / "tokenizer" / "tokenizer.json"]
            missing = [p for p in need if not p.exists()]
            return f"{missing[0]} missing" if missing else None
        if step.name.startswith("data:"):
            return self.data_problem(step.name.split(":", 1)[1])
        if step.name == "base":
            return _checkpoint_problem(self.base_dir / "step_00000000")
        if step.kind == "train":
            i = [s.name for s in self.cfg.stages].index(step.name)
            final = self.final_checkpoint(i)
            problem = _checkpoint_problem(final)
            if problem:
                return problem
            fmt = json.loads((final / "megaprolong.json").read_text()).get("optimizer_format")
            return None if fmt == "fully_reshardable" else f"{final}: optimizer state {fmt}, not portable"
        if step.name == "hf":
            return None if (self.hf_dir / "config.json").exists() and any(self.hf_dir.glob("*.safetensors")) else \
                f"{self.hf_dir}: no exported model"
        if step.name == "sft":
            model = self.sft_dir / "model"
            return None if (model / "config.json").exists() and any(model.glob("*.safetensors")) else \
                f"{model}: no fine-tuned model"
        if step.name == "eval":
            return None if (self.eval_dir / "report" / "report.json").exists() else f"{self.eval_dir}: no report"
        raise ValueError(step.name)

    def data_problem(self, name: str) -> str | None:
        from megaprolong.data.check import check_indexed, sidecar

        for prefix in self.cfg.data[name].domains:
            found = check_indexed(self.data_dir(name) / prefix)
            if found:
                return found[0]
            if not (sidecar(self.data_dir(name) / prefix) or {}).get("tokenizer_sha256"):
                return f"{self.data_dir(name) / prefix}.json: no tokenizer record"
        return None

    # ---- the boundaries ----
    def boundary_problems(self) -> list[str]:
        """Steps that do not connect given what exists: data made with another tokenizer than the one the
        export takes, an SFT chat format of another family, a stage whose final checkpoint would not be
        portable to the next one."""
        c, problems = self.cfg, []
        for name in c.data:  # made already: with the pipeline's tokenizer?
            if self.data_problem(name) is None and c.tokenizer and Path(c.tokenizer).exists():
                want = tokenizer_sha256(c.tokenizer)
                from megaprolong.data.check import sidecar

                for prefix in c.data[name].domains:
                    got = sidecar(self.data_dir(name) / prefix)["tokenizer_sha256"]
                    if got != want:
                        problems.append(f"data {name}/{prefix} was tokenized with another tokenizer (sha256 {got[:12]}) "
                                        f"than the pipeline's {c.tokenizer} ({want[:12]}): the HF export would carry "
                                        f"the wrong one")
        for i, stage in enumerate(c.stages):
            try:
                cfg = self.stage_config(i)
            except ConfigError as e:
                problems.append(f"stage {stage.name}: {e}")
                continue
            if cfg.checkpoint.optimizer_format == "dp_reshardable" and i < len(c.stages) - 1:
                problems.append(f"stage {stage.name}: checkpoint.optimizer_format=dp_reshardable: its final checkpoint "
                                f"would not carry the optimizer to stage {c.stages[i + 1].name}'s layout")
        if c.sft and c.base_model and Path(c.base_model, "config.json").exists():
            from megaprolong.sft.chat import chat_format_for
            from megaprolong.sft.config import SFTConfig

            chosen = load_config(SFTConfig, c.sft.recipe, c.sft.overrides).chat_format
            family = chat_format_for(json.loads(Path(c.base_model, "config.json").read_text()))
            if chosen not in ("auto", family):
                problems.append(f"sft: chat_format {chosen} does not match the base model's family ({family})")
        return problems

    def fit_lines(self) -> tuple[list[str], list[str]]:
        """megaprolong-plan's fit of each stage on its nodes: (lines, problems of stages that do not fit)."""
        from megaprolong.training.plan import fits as fits_gpu
        from megaprolong.training.plan import plan

        lines, problems = [], []
        cl = self.cfg.cluster
        for i, stage in enumerate(self.cfg.stages):
            cfg = self.stage_config(i)
            try:
                own, options = plan(cfg, stage.nodes, cl.gpus_per_node, cl.gpu_mem_gib)
            except ConfigError as e:
                problems.append(f"stage {stage.name}: {e}")
                continue
            fits = fits_gpu(own.total_gib, cl.gpu_mem_gib)
            days = own.step_s * cfg.train.steps / 86400
            lines.append(f"stage {stage.name}: {stage.nodes} node(s) x {cl.gpus_per_node}: TP{own.tp} PP{own.pp} CP{own.cp} "
                         f"DP{own.dp}, {own.total_gib:.1f} GiB/GPU of {cl.gpu_mem_gib:g} "
                         f"({'fits' if fits else 'DOES NOT FIT'}); ~{own.step_s:.0f} s/step, "
                         f"~{own.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, {cfg.train.steps} steps ~{days:.1f} days")
            if not fits:
                better = (f"; a layout that fits: TP{options[0].tp} PP{options[0].pp} CP{options[0].cp} "
                          f"({options[0].total_gib:.1f} GiB)" if options else "; no layout fits these nodes")
                problems.append(f"stage {stage.name} does not fit: {own.total_gib:.1f} GiB/GPU needed by TP{own.tp} "
                                f"PP{own.pp} CP{own.cp} on {stage.nodes} x {cl.gpus_per_node} GPUs of "
                                f"{cl.gpu_mem_gib:g} GiB{better}")
        return lines, problems

    # ---- the python steps, run here or in a one-task job ----
    def run_python(self, name: str, say=print) -> None:
        if name == "tiny-data":
            return self._tiny_data()
        if name.startswith("data:"):
            return self._data(name.split(":", 1)[1], say)
        if name == "base":
            from megaprolong.convert.jobs import hf_to_mcore

            hf_to_mcore(self.cfg.base_model, str(self.base_dir), force=True)
            return None
        if name == "hf":
            from megaprolong.convert.jobs import mcore_to_hf

            if self.cfg.tokenizer:  # the export carries the tokenizer the data was made with
                for data_name in self.cfg.data:
                    problems = [p for p in self.boundary_problems() if p.startswith(f"data {data_name}/")]
                    if problems:
                        raise ConfigError(problems[0])
            mcore_to_hf(str(self.final_checkpoint(len(self.cfg.stages) - 1)), str(self.hf_dir),
                        tokenizer=self.cfg.tokenizer, force=True)
            return None
        raise ValueError(name)

    def _tiny_data(self) -> None:
        from megaprolong.data.tiny import synthetic_chats, synthetic_corpus, train_tokenizer, write_jsonl

        docs = synthetic_corpus(n_docs=600, seed=0)
        for domain in TINY_DOMAINS:
            write_jsonl([d for d in docs if d["domain"] == domain], self.raw_dir / f"{domain}.jsonl")
        write_jsonl(synthetic_chats(200, seed=0), self.raw_dir / "chats.jsonl")
        train_tokenizer([d["text"] for d in docs], self.raw_dir / "tokenizer", vocab_size=512)

    def _data(self, name: str, say) -> None:
        import glob

        from megaprolong.data.preprocess import PreprocessConfig, preprocess

        domains = self.cfg.data[name].domains
        if len(domains) > 1:  # megatron's index writer imported once, not in a child process per domain
            import megatron.core.datasets.indexed_dataset  # noqa: F401
        for prefix, d in domains.items():
            inputs = [f for p in d.input for f in (sorted(glob.glob(p)) or [p])]
            report = preprocess(PreprocessConfig(inputs=inputs, tokenizer=self.cfg.tokenizer, quiet=True,
                                                 output_prefix=str(self.data_dir(name) / prefix), add_eos=d.add_eos,
                                                 min_tokens=d.min_tokens, group_by=d.group_by, domain=d.domain))
            say(f"data {name}/{prefix}: {report['documents']:,} documents, {report['tokens']:,} tokens")


def tokenizer_sha256(path: str | Path) -> str:
    from megaprolong.data.preprocess import tokenizer_file

    return hashlib.sha256(tokenizer_file(path).read_bytes()).hexdigest()


def _checkpoint_problem(step_dir: Path) -> str | None:
    from megaprolong.training.checkpoint_dir import verify

    if not (step_dir / "megaprolong.json").exists():
        return f"{step_dir}: not there"
    found = verify(step_dir, checksums=False)
    return found[0] if found else None

