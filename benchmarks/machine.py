"""What every benchmark prints first: the CPU it ran on, since figures differ
between CPU kinds (AVX2-only AMD, AVX-512/AMX Intel) more than between runs."""

import os
import platform


def cpu_description():
    """The CPU's model name, family/model numbers and the vector ISAs that
    decide TensorFlow's kernels (the model name alone may be just "AMD EPYC")."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family')} "
            f"model {fields.get('model')}; {' '.join(isa) or 'no AVX2'})")


def print_cpu():
    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores", flush=True)
