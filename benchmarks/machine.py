"""What every benchmark prints first: the CPU it ran on, since figures differ
between CPU kinds (AVX2-only AMD, AVX-512/AMX Intel) more than between runs."""

import datetime
import json
import os
import platform
import re
import shlex
import sys


def _cpuinfo():
    """The first processor's /proc/cpuinfo fields, or None where there is none."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return fields


def cpu_description():
    """The CPU's model name, family/model numbers and the vector ISAs that
    decide TensorFlow's kernels (the model name alone may be just "AMD EPYC")."""
    fields = _cpuinfo()
    if fields is None:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family')} "
            f"model {fields.get('model')}; {' '.join(isa) or 'no AVX2'})")


def cpu_file_name():
    """The CPU model as a file name, e.g. "amd_epyc_family25_model17",
    for results kept one file per CPU model."""
    fields = _cpuinfo()
    if fields is None:
        name = platform.processor() or platform.machine()
    else:
        name = (f"{fields.get('model name', platform.machine())} "
                f"family{fields.get('cpu family')} model{fields.get('model')}")
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def print_cpu():
    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores", flush=True)


def keep_per_cpu(results_dir, benchmark, configuration, entry):
    """Write `entry`, stamped with the CPU, the date and the command, into
    `results_dir/<benchmark>_<cpu>.json` under `configuration`, replacing that
    configuration's earlier run on this CPU model. Returns the file's path."""
    now = datetime.datetime.now(datetime.timezone.utc)
    entry = dict(entry, cpu=cpu_description(), date=now.isoformat(timespec="seconds"),
                 command=shlex.join(["python", *sys.argv]))
    path = os.path.join(results_dir, f"{benchmark}_{cpu_file_name()}.json")
    runs = {}
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)
    runs[configuration] = entry
    os.makedirs(results_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(sorted(runs.items())), f, indent=1)
    return path
