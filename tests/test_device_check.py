"""The GPU check cannot pass wrongly, and what it carries installs on the lent machine (all on the CPU).

- The driver fails when any step fails (a crash, a timeout, a missing success marker), after running the
  others, and the shell wrapper passes that on. It keeps the command's time budget (a late step is killed
  with its children; the rest fail unrun) and rewrites its summary after every step, so that a command
  killed from outside still brings back the steps it finished.
- The attention check's comparison passes a correct kernel in bf16 and flags its negative controls (a
  top-left causal mask, keys one position late); the SFT check flags conversations that see each other.
- The performance command's own runs work (at tiny sizes on the CPU): each gives its RESULT line, and a
  kernel that cannot run fails its steps, the worker's error shown.
- Those runs, the SFT check and the product's own run (megaprolong.train, checkpoints and a resume) need
  nothing that the lent machine lacks: they run under an interpreter that has only the machine's packages
  and the carried wheels (``device_python``).
- The benchmark's warm-up and timed backward each have their own graph.
- The wheel set resolves for the machine's Python 3.12 / manylinux x86-64 and brings no torch.
"""

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def package_names(listing: Path) -> set[str]:
    """The distributions a list names, one requirement a line (``name`` or ``name==version``)."""
    return {canonicalize_name(Requirement(line).name) for line in listing.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


@pytest.fixture(scope="module")
def device_python(tmp_path_factory) -> str:
    """An interpreter that imports only what the lent GPU machine has (benchmarks/device_packages.txt) and
    what the check carries there (benchmarks/device_wheels.txt), as installed here: a venv whose
    site-packages links those distributions and what they need here (their versions here may need other
    packages than there; that is theirs, not ours). The repository comes by PYTHONPATH, as on the machine."""
    wanted = package_names(REPO / "benchmarks" / "device_packages.txt") | \
        package_names(REPO / "benchmarks" / "device_wheels.txt")
    installed = {}
    for d in importlib.metadata.distributions():  # in sys.path order: the first of a name is the one imported
        installed.setdefault(canonicalize_name(d.metadata["Name"]), d)
    todo, linked = [n for n in wanted if n in installed], set()
    while todo:
        name = todo.pop()
        if name in linked:
            continue
        linked.add(name)
        for req in map(Requirement, installed[name].requires or []):
            if canonicalize_name(req.name) in installed and (req.marker is None or req.marker.evaluate({"extra": ""})):
                todo.append(canonicalize_name(req.name))
    venv = tmp_path_factory.mktemp("device_python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name in linked:
        dist = installed[name]
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {".."}:
            if (source := Path(dist.locate_file(top))).exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    assert "megatron-core" in linked and not linked & {"zstandard", "gigatoken", "trl", "datasets", "wandb"}
    seen = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert seen.stdout.split()[-1:] == [torch.__version__], seen.stderr[-1000:]  # this process's torch
    return str(python)


def driver_command(tmp_path, steps, wrapper=False, options=()) -> list[str]:
    cmd = (["bash", str(REPO / "benchmarks" / "device_check.sh")] if wrapper else
           [sys.executable, str(REPO / "benchmarks" / "device_check.py")])
    return [*cmd, "custom", "--out", str(tmp_path), "--steps", json.dumps(steps), *options]


def driver(tmp_path, steps, wrapper=False, options=(), scratch=None):
    """The driver run on ``steps``, its temporary folder made under ``scratch`` (default: a folder beside
    ``tmp_path``, so that a test's leftovers are pytest's to clean)."""
    scratch = scratch or tmp_path.parent / f"{tmp_path.name}-scratch"
    scratch.mkdir(exist_ok=True)
    return subprocess.run(driver_command(tmp_path, steps, wrapper, options), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "TMPDIR": str(scratch)})


def test_any_failed_step_fails_the_check(tmp_path):
    ok = ["fine", "MARK", sys.executable, "-c", "print('RESULT 1'); print('MARK')"]
    crash = ["crashes", None, sys.executable, "-c", "import sys; sys.exit(3)"]
    silent = ["no marker", "MARK", sys.executable, "-c", "print('all good?')"]
    scratch = tmp_path.parent / "scratch"
    assert driver(tmp_path, [ok], scratch=scratch).returncode == 0
    assert not any(scratch.iterdir())  # all passed: its temporary folder is gone
    for bad in (crash, silent):
        for wrapper in (False, True):
            out = driver(tmp_path, [ok, bad, ok], wrapper, scratch=scratch)
            assert out.returncode == 1, (bad[0], wrapper, out.stdout[-1000:], out.stderr[-1000:])
            assert "DEVICE_CHECK_FAILED" in out.stdout and "DEVICE_CHECK_OK" not in out.stdout
            kept = Path(re.search(r"the steps' full logs: (\S+)", out.stdout)[1])
            assert kept.parent.parent == scratch and (kept / f"{bad[0].replace(' ', '_')}.log").exists()
    summary = (tmp_path / "custom.txt").read_text().splitlines()
    assert summary[1].startswith("PASS fine") and "  RESULT 1" in summary
    assert any(line.startswith("FAIL no marker") and "no 'MARK' in its output" in line for line in summary)
    assert summary[-1] == "custom: 2/3 steps passed"
    assert [p.name for p in tmp_path.iterdir()] == ["custom.txt"]  # only the small summary comes back


def test_the_command_keeps_its_time_budget_and_ends_a_late_step_with_its_children(tmp_path):
    """The device's call has a hard limit: the command ends inside its budget, a step past it killed with
    everything it started (a torchrun's workers would hold the GPU), the steps left unrun fail."""
    ok = ["fine", "MARK", sys.executable, "-c", "print('MARK')"]
    orphan = tmp_path / "orphan-still-alive"
    late = ["late", None, "bash", "-c", f"(sleep 4; touch {orphan}) & sleep 60"]
    start = time.monotonic()
    out = driver(tmp_path, [ok, late, ok], options=("--budget-s", "3"))
    assert out.returncode == 1 and time.monotonic() - start < 15, out.stdout
    time.sleep(5)
    assert not orphan.exists()  # the step's child died with it
    summary = (tmp_path / "custom.txt").read_text().splitlines()
    assert summary[1].startswith("PASS fine") and re.match(r"FAIL late \(\d+ s\): timed out after \d s", summary[2])
    assert summary[3] == "FAIL fine (0 s): not run: the command's 3 s were spent"
    assert summary[-1] == "custom: 1/3 steps passed"


def test_a_command_killed_from_outside_leaves_the_steps_it_finished(tmp_path):
    ok = ["fine", "MARK", sys.executable, "-c", "print('RESULT 1'); print('MARK')"]
    slow = ["slow", None, "sleep", "60"]
    proc = subprocess.Popen(driver_command(tmp_path, [ok, slow]), stdout=subprocess.DEVNULL, cwd=tmp_path,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(tmp_path.parent)})
    summary, deadline = tmp_path / "custom.txt", time.monotonic() + 60
    while "slow" not in (summary.read_text() if summary.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # as the device's call limit would
    proc.wait()
    assert summary.read_text().splitlines()[1:] == ["PASS fine (0 s)", "  RESULT 1", "(running step 2 of 2: slow)"]


def test_the_attention_check_passes_bf16_rounding_and_flags_its_negative_controls():
    import device_attention_check as check

    from megaprolong.model.attention import select_kernel

    run = select_kernel("cpu-blockwise", "cpu", torch.bfloat16).run
    shape = dict(heads=4, groups=2, dim=32)
    for cp, rank in ((1, 0), (2, 1), (4, 3)):
        assert max(check.errors(run, check.LENGTHS, cp, rank, "cpu", **shape).values()) <= check.TOLERANCE
    for control, worst in check.negative_controls(run, "cpu", **shape).items():
        assert worst > 10 * check.TOLERANCE, control


def test_the_performance_runs_work_and_a_kernel_that_cannot_run_fails_them(tmp_path, monkeypatch, device_python):
    import device_check as check

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(check, "PY", device_python)  # nothing the GPU machine lacks
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    plan = check.PerformancePlan(seqs=(1024,), kernels=("sdpa", "torch-varlen"), layers=1, hidden=64, ffn=128,
                                 heads=4, groups=2, vocab=512, mean_doc=256, loss_chunk_tokens=512, head_dim=16,
                                 attention_cases="2048:2", timeout_s=120)
    assert check.run_plan("performance", plan.steps(tmp_path), tmp_path / "out", tmp_path / "logs") == 1
    summary = (tmp_path / "out" / "performance.txt").read_text()
    assert re.search(r"PASS 8B-shaped layers, 1K, sdpa .*\n  RESULT seq 1024 sdpa: [\d,]+ tok/s/GPU, [\d.]+ TFLOPS/GPU, "
                     r"MFU [\d.]+%, peak \S+ GiB\n", summary), summary
    # torch-varlen needs CUDA: its training run and the attention table (a 'failed' row) fail, saying why
    assert "FAIL 8B-shaped layers, 1K, torch-varlen" in summary
    assert "| [rank0]: ValueError: attention kernel 'torch-varlen' needs CUDA" in summary
    assert re.search(r"RESULT +2048 +2 +1024 sdpa +[\d.]+ +[\d.]+\n", summary)
    assert "FAIL one attention layer, SEQ:CP 2048:2" in summary
    assert summary.endswith("performance: 1/3 steps passed\n")


def test_the_performance_runs_fit_the_gpus_memory(tmp_path):
    """On an H100 (80 GB) the 8B-shaped runs take as many layers as the planner fits, not the H200's 12 (an
    out-of-memory error would lose the step); on an H200 all 12."""
    import device_check as check
    from megaprolong.training.plan import fits

    h100, h200 = 81559 / 1024, 143771 / 1024  # GiB, as nvidia-smi reports the lent machines
    plan = check.PerformancePlan(gpu_mem_gib=h100)
    for seq in plan.seqs:
        n = plan.layers_for(seq)
        assert 1 <= n < plan.layers and fits(plan.estimate_gib(seq, n), h100)
        assert not fits(plan.estimate_gib(seq, n + 1), h100)
        assert any(f"--layers {n} " in " ".join(s.argv) and f"({n} layers: plan" in s.name
                   for s in plan.steps(tmp_path) if f"--seq {seq} " in " ".join(s.argv))
    assert plan.layers_for(131072) < plan.layers_for(65536)
    assert [check.PerformancePlan(gpu_mem_gib=h200).layers_for(seq) for seq in plan.seqs] == [12, 12]


def test_the_sft_check_judges_logits_and_gradients(tmp_path, device_python):
    out = subprocess.run([device_python, str(REPO / "benchmarks" / "device_sft_attention_check.py"), "--device", "cpu",
                          "--tokens", "4096"], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "SFT_ATTENTION_OK" in out.stdout, out.stderr[-2000:]
    assert "negative control (conversations seeing each other)" in out.stdout and "flagged" in out.stdout


def test_the_product_run_and_its_resume_need_nothing_the_gpu_machine_lacks(tmp_path, device_python):
    """The correctness command's megaprolong.train step, on the CPU in fp32 (there the resume is exact)."""
    out = subprocess.run([device_python, str(REPO / "benchmarks" / "device_train_resume.py"), str(tmp_path),
                          "--precision", "fp32"], capture_output=True, text=True, timeout=500, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
                              "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "TRAIN_RESUME_OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"resumed at step 4: said so, steps 5-12 loss within \S+ of the straight run's \(tolerance "
                     r"1e-06\), \d+ s ok", out.stdout), out.stdout


def test_benchmark_warm_up_and_timed_backward_are_separate_graphs():
    import attention

    r = attention.measure_one("cpu-blockwise", 1024, 2, 2, 1, 16, "cpu", warmup=True)
    assert r["kernel"] == "cpu-blockwise" and r["local_queries"] == 512


DEVICE_TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                 "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--only-binary=:all:"]


def test_the_carried_wheels_resolve_for_the_gpu_machine(tmp_path):
    wheels = tmp_path / "whl"
    got = subprocess.run(["bash", str(REPO / "benchmarks" / "device_wheels.sh"), str(wheels)], capture_output=True,
                         text=True, timeout=600, cwd=REPO, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                                                 "PYTHON": sys.executable, "HOME": str(tmp_path)})
    assert got.returncode == 0, got.stderr[-2000:]
    report = tmp_path / "report.json"
    dry = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                          "--no-index", "--find-links", str(wheels), "--no-deps", *DEVICE_TARGET, "--target",
                          str(tmp_path / "site"), "-r", str(REPO / "benchmarks" / "device_wheels.txt")],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    installed = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert installed == {"megatron-core": "0.19.2"}
    files = list(wheels.glob("*.whl"))
    assert not [f for f in files if f.name.startswith(("torch-", "nvidia", "triton"))]  # its own torch stays
    assert all("cp312" in f.name or "py3-none" in f.name for f in files)
    assert sum(f.stat().st_size for f in files) < 32 * 2**20  # with the working tree, under the 64 MiB carried
    on_machine = package_names(REPO / "benchmarks" / "device_packages.txt")
    carried = {canonicalize_name(f.name.split("-")[0]) for f in files}
    for f in files:
        with zipfile.ZipFile(f) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        needs = [line.split(":", 1)[1].split(";")[0].strip() for line in meta.splitlines()
                 if line.startswith("Requires-Dist:") and "extra ==" not in line]
        for need in needs:
            assert canonicalize_name(Requirement(need).name) in on_machine | carried, \
                f"{f.name} needs {need}: neither on the machine nor carried"
