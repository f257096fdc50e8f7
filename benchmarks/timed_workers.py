"""Benchmark workers: each configuration measured in a process of its own,
which builds once, warms up, then answers `run N` with the seconds N steps
took. The caller interleaves rounds across workers, so slow drifts in the
machine's speed fall on all of them alike."""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def answer_runs(step, version, warmup):
    """The worker's side: warm up, say ready (with `version`), then time runs."""
    for _ in range(warmup):
        step()
    print(json.dumps({"ready": version}), flush=True)
    for line in sys.stdin:
        steps = int(line.split()[1])
        start = time.perf_counter()
        for _ in range(steps):
            step()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def add_round_arguments(parser, settle):
    """The flags of the timed rounds, shared by every benchmark that uses workers."""
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="batches per timed round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--settle", type=float, default=settle,
                        help="seconds of rest before each timed round")


def measure_in_rounds(workers, args):
    """`args.repeats` interleaved rounds, each starting with a different worker,
    with a pause before each measurement: PyTorch's OpenMP threads spin for a
    while after their work and would slow whoever runs next."""
    for round_index in range(args.repeats):
        shift = round_index % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            time.sleep(args.settle)
            worker.measure(args.steps, args.batch_size)


def repo_environment(**variables):
    """This process's environment with the repository importable and `variables` set."""
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Worker:
    """The caller's side: starts `command` and collects images/s per round."""

    def __init__(self, key, command, env):
        self.key = key
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
        self.version = self._read()["ready"]
        self.rates = []

    def _read(self):
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"benchmark worker {self.key} exited early")
            if line.startswith("{"):
                return json.loads(line)

    def measure(self, steps, batch_size):
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        self.rates.append(steps * batch_size / self._read()["seconds"])

    def close(self):
        self.process.stdin.close()
        self.process.wait()
