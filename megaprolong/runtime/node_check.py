"""``python -m megaprolong.runtime.node_check --gpus N``: is this node fit to train on?

Run once per node by the sbatch scripts before torchrun (``srun --ntasks-per-node=1``). Checks that the
node shows the ``N`` GPUs the job asked for, that each of them allocates memory and computes, and that a
small all-reduce across them completes (NCCL; gloo on a machine without GPUs, where only the processes and
the all-reduce are checked). Prints one line ``node_check: HOST ok ...`` or ``node_check: HOST FAILED: why``
and exits 0 or 1; the batch shell names the nodes that did not say ok and requeues the job without them.

``MEGAPROLONG_NODE_CHECK_FAIL=HOST[,HOST]`` makes the check fail on those hosts (for tests of the launch
scripts on machines whose GPUs, if any, are all fine).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

TIMEOUT_S = 120


def _worker(local_rank: int, world: int, port: int, use_cuda: bool, errors) -> None:
    import torch
    import torch.distributed as dist

    try:
        if use_cuda:
            torch.cuda.set_device(local_rank)
            x = torch.ones(256 << 20, dtype=torch.uint8, device="cuda")  # 256 MiB
            if int(x.sum().item()) != 256 << 20:
                raise RuntimeError("a 256 MiB buffer does not add up")
            del x
        store = dist.TCPStore("127.0.0.1", port, world, is_master=local_rank == 0,
                              timeout=datetime.timedelta(seconds=TIMEOUT_S))
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=local_rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        t = torch.full((1 << 20,), float(local_rank + 1), device="cuda" if use_cuda else "cpu")
        dist.all_reduce(t)
        want = world * (world + 1) / 2
        if float(t[0].item()) != want:
            raise RuntimeError(f"all-reduce gave {float(t[0].item())}, expected {want}")
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001  every failure is the node's
        errors.put(f"{'GPU' if use_cuda else 'process'} {local_rank}: {type(e).__name__}: {e}")


def check(gpus: int) -> str | None:
    """Why this node is not fit (None when it is)."""
    host = socket.gethostname().split(".")[0]
    if host in os.environ.get("MEGAPROLONG_NODE_CHECK_FAIL", "").split(","):
        return "failure injected by MEGAPROLONG_NODE_CHECK_FAIL"
    import torch
    import torch.multiprocessing as mp

    use_cuda = gpus > 0
    if use_cuda:
        if not torch.cuda.is_available():
            return f"the job asked for {gpus} GPU(s), CUDA sees none ({torch.cuda.device_count()})"
        if torch.cuda.device_count() < gpus:
            return f"the job asked for {gpus} GPU(s), CUDA sees {torch.cuda.device_count()}"
    # one process per GPU (NCCL takes one rank per GPU: a second process on a 1-GPU node has no GPU of its
    # own); without GPUs two processes, so that the all-reduce crosses processes
    world = gpus if use_cuda else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, use_cuda, errors), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S + 30
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    found = []
    while not errors.empty():
        found.append(errors.get())
    if hung:
        found.append(f"processes {hung} did not finish within {TIMEOUT_S + 30} s")
    found += [f"process {i} died (exit {p.exitcode})" for i, p in enumerate(procs) if p.exitcode not in (0, None)
              and not any(line.startswith(("GPU " + str(i), "process " + str(i))) for line in found)]
    return "; ".join(found) or None


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaprolong.runtime.node_check", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs this node must show (default: $SLURM_GPUS_ON_NODE, the GPUs Slurm gave the job "
                             "here, else every GPU CUDA sees; 0 on a machine without GPUs)")
    args = parser.parse_args(argv)
    host = socket.gethostname().split(".")[0]
    start = time.monotonic()
    if args.gpus is None:
        args.gpus = int(os.environ["SLURM_GPUS_ON_NODE"]) if os.environ.get("SLURM_GPUS_ON_NODE") else _visible_gpus()
    why = check(args.gpus)
    if why:
        print(f"node_check: {host} FAILED: {why}", flush=True)
        return 1
    print(f"node_check: {host} ok ({args.gpus} GPU(s), all-reduce in {time.monotonic() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
