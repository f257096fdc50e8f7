"""Which grouped convolutions the AVX2 op runs on this CPU.

The op beat oneDNN by 1.8-3.2x at 4 channels per group on an AMD EPYC and on
an Intel Xeon, but lost by a quarter at 16 and 32 on the Xeon: no table chosen
on one machine fits every CPU. So the first time a shape is traced here, the op
(batch norm and ReLU fused, as at inference) and the kernel TensorFlow runs in
its place are timed against each other, call by call in alternating order, for
a fraction of a second; the op gets the shape only if its fastest call beat
TensorFlow's.

Decisions are kept beside the compiled op, in one JSON file per library (by
its SHA-256), CPU (model name and flags) and oneDNN setting, so later
processes read them instead of measuring again. Processes that meet a new
shape at once take turns (a lock file): the second reads the first's decision.
A file that doesn't parse or whose checksum doesn't match is measured anew
and replaced.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
import warnings

from keras_resnext.kernels import avx2

# The batch of the timing runs: the traced batch is often unknown, and 8 is
# what the benchmarks and serving use.
BATCH = 8
# Timed pairs of calls per shape: more until TIME_BUDGET_S has passed (the
# warm-up comes on top) and there are MIN_PAIRS, or MAX_PAIRS. A kernel
# DECISIVE times faster in the first pair needs no more: TensorFlow's grouped
# kernel without oneDNN takes 0.2-0.4 s a call at 56x56, 5-15x the op's.
MIN_PAIRS, MAX_PAIRS, TIME_BUDGET_S, DECISIVE = 3, 15, 0.1, 2.0
_FORMAT = 1

_lock = threading.Lock()
_decided = {}  # (decisions file, shape key) -> whether the op runs it
_unsaved = set()  # decisions files this process couldn't write (warned once each)


def shape_key(group_width, stride, height, width, channels):
    return f"{group_width} per group, stride {stride}, {height}x{width}x{channels}"


def op_wins(group_width, stride, height, width, channels, onednn, timed_calls):
    """Whether the AVX2 op runs this grouped 3x3 faster than TensorFlow here.

    `timed_calls(batch)` returns (ours, tensorflows): two calls without
    arguments that run the op and TensorFlow's kernel on one batch of this
    shape. It is called only if no decision is kept for the shape yet.
    """
    path = decisions_path(onednn)
    key = shape_key(group_width, stride, height, width, channels)
    decided = _decided.get((path, key))
    if decided is not None:
        return decided
    # One measurement at a time: two at once would slow each other down.
    with _lock, _file_lock(path):
        decided = _decided.get((path, key))
        if decided is not None:
            return decided
        decisions = read_decisions(path)
        if key not in decisions:
            decisions[key] = measure(*timed_calls(BATCH))
            _write(path, decisions, onednn)
        for known, record in decisions.items():
            _decided[path, known] = record["use_op"]
        return decisions[key]["use_op"]


def decisions_path(onednn):
    model, flags = avx2.cpu_identity()
    machine = hashlib.sha256(repr((model, sorted(flags.split()), bool(onednn))).encode())
    library = avx2.library_digest() or "unloaded"
    return os.path.join(avx2.cache_dir(),
                        f"grouped_conv-{library[:16]}-choices-{machine.hexdigest()[:16]}.json")


def measure(ours, tensorflows):
    """Times the two calls against each other, alternating which goes first.

    Returns the decision record: each one's fastest call in ms, and whether
    ours was the faster. Fastest, not median: other processes on the cores
    only ever add time, and a few calls on a busy machine (two shared cores
    here) gave medians that picked the kernel 2.4x slower.
    """
    ours()  # each call's first run makes oneDNN's primitives, grappler's graph
    tensorflows()
    ours_ms, tensorflows_ms = [], []
    start = time.perf_counter()
    for pair in range(MAX_PAIRS):
        for which in ((0, 1) if pair % 2 == 0 else (1, 0)):
            began = time.perf_counter()
            (ours, tensorflows)[which]()  # returns once the CPU kernels are done
            (ours_ms, tensorflows_ms)[which].append((time.perf_counter() - began) * 1e3)
        speed_up = min(tensorflows_ms) / min(ours_ms)
        decisive = not 1 / DECISIVE < speed_up < DECISIVE
        if time.perf_counter() - start > TIME_BUDGET_S and (pair + 1 >= MIN_PAIRS or decisive):
            break
    return {"ours_ms": round(min(ours_ms), 4), "tensorflow_ms": round(min(tensorflows_ms), 4),
            "speed_up": round(speed_up, 4), "pairs": len(ours_ms), "use_op": speed_up > 1.0}


def read_decisions(path):
    """The decisions kept in `path`: {shape key: record}; {} where the file is
    missing, unreadable, or not one this module wrote intact."""
    try:
        with open(path) as f:
            kept = json.load(f)
        decisions = kept["decisions"]
        valid = (kept["format"] == _FORMAT and kept["sha256"] == _checksum(decisions)
                 and all(isinstance(record["use_op"], bool) for record in decisions.values()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}
    return decisions if valid else {}


def _checksum(decisions):
    return hashlib.sha256(json.dumps(decisions, sort_keys=True).encode()).hexdigest()


def _write(path, decisions, onednn):
    """Replaces `path` in one rename, so readers see the old file or the new."""
    model, flags = avx2.cpu_identity()
    kept = {"format": _FORMAT, "cpu": model, "cpu_flags": flags, "onednn": bool(onednn),
            "library_sha256": avx2.library_digest(), "batch": BATCH,
            "decisions": decisions, "sha256": _checksum(decisions)}
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "w") as f:
            json.dump(kept, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        _warn_unsaved(path, error)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


@contextlib.contextmanager
def _file_lock(path):
    """Holds `path.lock` exclusively (released by the OS if the process dies);
    without a writable cache folder, no lock: each process measures alone."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        _warn_unsaved(path, error)
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # ENOLCK: an NFS mount without a lock daemon
            warnings.warn(f"keras_resnext: can't lock {path}.lock ({error}); processes "
                          f"meeting a new shape at once may each time it.",
                          RuntimeWarning, stacklevel=4)
        yield
    finally:
        os.close(handle)


def _warn_unsaved(path, error):
    if path not in _unsaved:
        _unsaved.add(path)
        warnings.warn(f"keras_resnext: can't keep the AVX2 op's per-shape timings in {path} "
                      f"({error}); each process will time its shapes again.",
                      RuntimeWarning, stacklevel=4)
