"""The GPU checks, in two commands that each fit a few minutes (with room to run again in one lease):

    python benchmarks/device_check.py correctness   # ~4 min: the node check, kernels = CPU reference (+
                                                    #   negative controls), GPU = CPU parity, document
                                                    #   masking (fp32 and bf16), SFT attention, and
                                                    #   megaprolong.train itself (checkpoints, a resume)
    python benchmarks/device_check.py performance   # 8B-shaped layers at 64K / 128K (tokens/s/GPU, TFLOPS,
                                                    #   MFU, peak memory; torch varlen vs the SDPA loop), one
                                                    #   attention layer at 64K, 128K and the 512K CP=8 share

(``benchmarks/device_check.sh`` installs the carried wheels first, then runs this.) Every step is a command
whose exit code and success marker are both checked: a step that crashes, times out, or ends without its
marker fails, and any failed step makes the command exit 1 after the others ran. Only small text comes back:
``$OUT/<command>.txt`` (each step PASS / FAIL, its ``RESULT`` lines, the tail of a failed step's log); full
logs and tensors stay in a temporary folder, removed when every step passed and kept (its path printed) when
one failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MFU_PEAK_TFLOPS = 989.4  # H100 / H200 dense bf16


@dataclass
class Step:
    name: str
    argv: list[str]
    marker: str | None = None  # must appear in the output (None: the exit code alone)
    timeout_s: int = 600
    env: dict = field(default_factory=dict)
    cwd: Path = REPO


@dataclass
class Outcome:
    step: Step
    ok: bool
    seconds: float
    why: str
    results: list[str]
    tail: list[str]


def torchrun(*args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *args]


def run_step(step: Step, logs: Path, timeout_s: float) -> Outcome:
    """``step`` in its own process group, so that a timeout ends all of it (torchrun's workers too: left
    running they would hold the GPU through the next steps)."""
    log = logs / f"{step.name.replace(' ', '_')}.log"
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=step.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **step.env}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        why = "" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        why = f"timed out after {timeout_s:.0f} s"
    log.write_text(output)
    if not why and step.marker and step.marker not in output:
        why = f"exit 0 but no {step.marker!r} in its output"
    lines = output.splitlines()
    results = [ln for ln in lines if ln.startswith("RESULT")]
    return Outcome(step, not why, time.monotonic() - start, why, results,
                   [] if not why else [ln for ln in lines if not ln.startswith("RESULT")][-20:])


def run_plan(title: str, steps: list[Step], out: Path, logs: Path, budget_s: float = math.inf) -> int:
    """Run every step within ``budget_s`` seconds in all (a step gets what is left of it, if less than its
    own timeout; a step with nothing left fails unrun); 0 when all passed, else 1. ``out/<title>.txt`` is
    rewritten after every step, so that a command killed from outside still brings back what it finished."""
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    summary = out / f"{title}.txt"
    report, failed, deadline = [f"device check: {title}"], 0, time.monotonic() + budget_s
    for i, step in enumerate(steps):
        summary.write_text("\n".join([*report, f"(running step {i + 1} of {len(steps)}: {step.name})"]) + "\n")
        print(f"== {step.name}", flush=True)
        left = deadline - time.monotonic()
        if left < 1:
            o = Outcome(step, False, 0.0, f"not run: the command's {budget_s:.0f} s were spent", [], [])
        else:
            o = run_step(step, logs, min(step.timeout_s, left))
        failed += not o.ok
        line = f"{'PASS' if o.ok else 'FAIL'} {step.name} ({o.seconds:.0f} s){': ' + o.why if o.why else ''}"
        print(line, *o.results, *o.tail, sep="\n", flush=True)
        report += [line, *(f"  {r}" for r in o.results), *(f"  | {t}" for t in o.tail)]
    verdict = f"{title}: {len(steps) - failed}/{len(steps)} steps passed"
    report.append(verdict)
    summary.write_text("\n".join(report) + "\n")
    print(verdict, "DEVICE_CHECK_OK" if not failed else "DEVICE_CHECK_FAILED", flush=True)
    return 1 if failed else 0


def correctness_steps(tmp: Path) -> list[Step]:
    workers = REPO / "tests" / "workers"
    env = {"PYTHONWARNINGS": "ignore"}
    compare = ("import sys, torch\n"
               "d = sys.argv[1]; c = torch.load(f'{d}/cpu.pt'); g = torch.load(f'{d}/gpu.pt')\n"
               "rel = max(((g['grads'][k] - v).abs().max() / v.abs().max()).item() for k, v in c['grads'].items())\n"
               "par = max((g['params'][k] - v).abs().max().item() for k, v in c['params'].items())\n"
               "loss = max(abs(a - b) / abs(b) for a, b in zip(g['loss'], c['loss']))\n"
               "held = abs(g['heldout'][0] - c['heldout'][0]) / c['heldout'][0]\n"
               "print(f'RESULT parity GPU vs CPU (fp32, 3 steps): loss {loss:.1e}, grads {rel:.1e}, params {par:.1e}, '\n"
               "      f'held-out loss {held:.1e}')\n"
               "assert loss < 1e-4 and rel < 1e-3 and par < 1e-4 and held < 1e-4, 'GPU run differs from the CPU run'\n"
               "print('PARITY_OK')\n")
    return [
        Step("environment", [PY, "-c", "import torch, megatron.core as m; print('RESULT torch', torch.__version__, "
                             "'megatron-core', m.__version__, torch.cuda.get_device_name()); print('ENV_OK')"], "ENV_OK"),
        Step("node check, one GPU (the sbatch scripts' check of every node)",
             [PY, "-m", "megaprolong.runtime.node_check", "--gpus", "1"], "ok (1 GPU(s)", timeout_s=200),
        Step("attention kernels vs the CPU reference", [PY, "benchmarks/device_attention_check.py"],
             "DEVICE_ATTENTION_OK", env=env),
        Step("parity: the CPU run", torchrun(str(workers / "parity.py"), str(tmp / "cpu.pt"), str(tmp / "init.pt")),
             None, env={**env, "CUDA_VISIBLE_DEVICES": ""}),
        Step("parity: the GPU run", torchrun(str(workers / "parity.py"), str(tmp / "gpu.pt"), str(tmp / "init.pt")),
             None, env=env),
        Step("parity: GPU = CPU", [PY, "-c", compare, str(tmp)], "PARITY_OK"),
        Step("document masking on the GPU (fp32: SDPA)", torchrun(str(workers / "attention_checks.py")),
             "ATTENTION_CHECKS_OK", env=env),
        Step("document masking on the GPU (bf16: torch varlen, the training default)",
             torchrun(str(workers / "attention_checks.py"), "train.precision=bf16",
                      "model.attention_kernel=torch-varlen"),
             "ATTENTION_CHECKS_OK", env=env),
        Step("SFT attention: varlen = sdpa on a packed 64K row", [PY, "benchmarks/device_sft_attention_check.py"],
             "SFT_ATTENTION_OK", env=env),
        Step("megaprolong.train on the GPU (tiny recipe, bf16, full recompute): checkpoints, a resume = the straight run",
             [PY, "benchmarks/device_train_resume.py", str(tmp / "train")], "TRAIN_RESUME_OK", timeout_s=400, env=env),
    ]


def throughput_result(path: str) -> str:
    """The RESULT line of a ``train_throughput.py --json`` log."""
    r = [json.loads(line) for line in open(path) if line.startswith("{")][-1]
    return (f"RESULT seq {r['seq']} {r['kernel']}: {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, "
            f"{r['tflops_per_gpu']:.1f} TFLOPS/GPU, MFU {r['tflops_per_gpu'] / MFU_PEAK_TFLOPS:.1%}, "
            f"peak {r['cuda_peak_gib']:.1f} GiB")


def show_failure(log: Path) -> str:
    """Shell that prints a failed torchrun's log tail, then the worker's own error lines (torchrun's summary
    at the end of the log names only the exit code)."""
    return (f"tail -12 {log}; echo '-- the errors:'; grep -E '(Error|Exception|error):' {log} | "
            f"grep -v ChildFailedError | tail -6")


@dataclass
class PerformancePlan:
    """The performance command's runs. The defaults are the device run: Llama-3-8B's layer shapes, up to 12
    layers with the 128K-vocabulary embedding and LM head (they fit one H200 at 128K). With ``gpu_mem_gib``
    each length runs the most layers up to ``layers`` that the planner's estimate fits in that memory (an
    H100's 80 GB: 8 at 64K, 5 at 128K), so that no run is lost to an out-of-memory error; the step's name
    says the count and the estimate, beside the measured peak. The test runs the same commands at tiny
    sizes on the CPU."""
    seqs: tuple[int, ...] = (65536, 131072)
    kernels: tuple[str, ...] = ("torch-varlen", "sdpa")
    layers: int = 12
    hidden: int = 4096
    ffn: int = 14336
    heads: int = 32
    groups: int = 8
    vocab: int = 128256
    mean_doc: int = 16384
    loss_chunk_tokens: int = 8192
    head_dim: int = 128
    attention_cases: str = "65536:1,131072:1,524288:8"  # SEQ:CP; 524288:8 is one rank's share at 512K, CP=8
    timeout_s: int = 300
    gpu_mem_gib: float | None = None  # the GPU's memory: fewer layers where ``layers`` would not fit

    def estimate_gib(self, seq: int, layers: int) -> float:
        """The planner's per-GPU memory of one training run (megaprolong-plan's estimate, one GPU)."""
        from megaprolong.config import load_config
        from megaprolong.training.config import Config
        from megaprolong.training.plan import calibrated_mfu, estimate

        cfg = load_config(Config, None, [
            f"model.num_layers={layers}", f"model.hidden_size={self.hidden}", f"model.ffn_hidden_size={self.ffn}",
            f"model.num_attention_heads={self.heads}", f"model.num_query_groups={self.groups}",
            f"model.vocab_size={self.vocab}", f"train.seq_length={seq}", "train.global_batch_size=1",
            "train.micro_batch_size=1", "train.recompute=full", f"train.loss_chunk_tokens={self.loss_chunk_tokens}"])
        return estimate(cfg, 1, 1, 1, 1, calibrated_mfu()).total_gib

    def layers_for(self, seq: int) -> int:
        """The most layers up to ``layers`` that fit ``gpu_mem_gib`` at ``seq`` (at least one)."""
        from megaprolong.training.plan import fits

        if self.gpu_mem_gib is None:
            return self.layers
        return next((n for n in range(self.layers, 0, -1) if fits(self.estimate_gib(seq, n), self.gpu_mem_gib)), 1)

    def steps(self, tmp: Path) -> list[Step]:
        steps = []
        for seq in self.seqs:
            layers = self.layers_for(seq)
            sized = "" if self.gpu_mem_gib is None else \
                f" ({layers} layers: plan {self.estimate_gib(seq, layers):.0f} of {self.gpu_mem_gib:.0f} GiB)"
            for kernel in self.kernels:
                log = tmp / f"step_{seq}_{kernel}.log"
                run = torchrun("benchmarks/train_throughput.py", "--seq", str(seq), "--layers", str(layers),
                               "--hidden", str(self.hidden), "--ffn", str(self.ffn), "--heads", str(self.heads),
                               "--groups", str(self.groups), "--vocab", str(self.vocab), "--mean-doc",
                               str(self.mean_doc), "--steps", "2", "--json", f"model.attention_kernel={kernel}",
                               f"train.loss_chunk_tokens={self.loss_chunk_tokens}")
                steps.append(Step(f"8B-shaped layers, {seq // 1024}K, {kernel}{sized}",
                                  ["bash", "-c", f"set -e; {' '.join(run)} > {log} 2>&1 || {{ {show_failure(log)}; exit 1; }}; "
                                   f"{PY} {__file__} throughput-result {log}"], "RESULT seq", timeout_s=self.timeout_s))
        table = tmp / "attention_layer.txt"  # a case that failed is a row saying so: the step fails on it
        steps.append(Step(f"one attention layer, SEQ:CP {self.attention_cases}",
                          ["bash", "-c", f"set -e; {PY} benchmarks/attention.py --heads {self.heads} --groups "
                           f"{self.groups} --head-dim {self.head_dim} --cases {self.attention_cases} --kernels "
                           f"{','.join(self.kernels)} > {table}; sed 's/^/RESULT /' {table}; "
                           f"if grep -q failed {table}; then exit 1; fi"], "RESULT", timeout_s=self.timeout_s))
        return steps


def gpu_memory_gib() -> float:
    """GPU 0's memory, read in a child process (the driver holds no CUDA context while the steps run)."""
    out = subprocess.run([PY, "-c", "import torch; print(torch.cuda.get_device_properties(0).total_memory)"],
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1]) / 2**30


def performance_steps(tmp: Path) -> list[Step]:
    """The device run; ``LAYERS=N`` runs N layers at every length, unfitted."""
    if os.environ.get("LAYERS"):
        return PerformancePlan(layers=int(os.environ["LAYERS"])).steps(tmp)
    return PerformancePlan(gpu_mem_gib=gpu_memory_gib()).steps(tmp)


PLANS = {"correctness": correctness_steps, "performance": performance_steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", choices=[*PLANS, "custom", "throughput-result"],
                    help="which checks (custom: --steps; throughput-result FILE: a train_throughput log's RESULT)")
    ap.add_argument("file", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT") or "device-check", help="where the summary goes ($OUT)")
    ap.add_argument("--budget-s", type=float, default=540,
                    help="seconds for the whole command (default %(default)s: inside the device's 10-minute call, "
                         "with the wheels' install); steps left when they are spent fail unrun")
    ap.add_argument("--steps", help=argparse.SUPPRESS)  # JSON [[name, marker, argv...], ...]: the driver's tests
    a = ap.parse_args(argv)
    if a.plan == "throughput-result":
        print(throughput_result(a.file))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix=f"megaprolong-device-{a.plan}-"))
    if a.plan == "custom":
        steps = [Step(name, list(cmd), marker) for name, marker, *cmd in json.loads(a.steps)]
    else:
        steps = PLANS[a.plan](tmp)
    rc = run_plan(a.plan, steps, Path(a.out), tmp / "logs", a.budget_s)
    if rc == 0:
        shutil.rmtree(tmp)  # the tensors of the parity runs are large; nothing there is needed any more
    else:
        print(f"the steps' full logs: {tmp / 'logs'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
