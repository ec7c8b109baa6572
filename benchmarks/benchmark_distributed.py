"""Data-parallel inversion on the CPU (gloo): seconds per step with 1 process and with 2 ranks, same global
batch. Not a pytest-benchmark test (it launches torchrun); run it directly:

    python benchmarks/benchmark_distributed.py --batch-size 128 --steps 20

Each world size runs ``invert`` twice in one torchrun job (2 steps, then ``2 + steps`` steps, one
thread per rank) and reports ``(t_long - t_short) / steps``: the seconds per step without the set-up
and the final metrics. One JSON line per world size.
"""

import argparse
import json
import os
import socket
import subprocess
import sys

WORKER = r"""
import json, sys, time, torch
import torch.nn as nn
from tldr_fast import distributed, invert

args = json.loads(sys.argv[1])
torch.set_num_threads(1)
with distributed.process_group("cpu"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    seconds = []
    for steps in (2, 2 + args["steps"]):
        start = time.perf_counter()
        inv = invert(net, 10, (1, 28, 28), steps=steps, batch_size=args["batch_size"], device="cpu", progress=False, backend="torch",
                     select=1, eval_per_class=1, log_every=steps)
        seconds.append(time.perf_counter() - start)
    if distributed.is_main():
        params = sum(p.numel() for p in inv.generator.parameters())
        print(json.dumps({"step_s": (seconds[1] - seconds[0]) / args["steps"], "generator_params": params}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128, help="the global batch")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    a = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for world in a.ranks:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(world),
            "--master-port",
            str(_free_port()),
            "--no-python",
            sys.executable,
            "-c",
            WORKER,
            json.dumps({"batch_size": a.batch_size, "steps": a.steps}),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        print(
            json.dumps(
                {
                    "world": world,
                    "batch_size": a.batch_size,
                    "steps": a.steps,
                    **json.loads(out.strip().splitlines()[-1]),
                }
            )
        )


if __name__ == "__main__":
    main()
