"""What every benchmark prints first: the CPU it ran on, since figures differ
between CPU kinds (AVX2-only AMD, AVX-512/AMX Intel) more than between runs."""

import os
import platform
import re


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
