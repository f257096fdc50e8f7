"""What a run keeps in its model_dir besides checkpoints: the lock, the CSV
log, metrics.json, TensorBoard summaries and the record of its export.

Files are written whole (`_write_atomically`), so a kill leaves the old
version or the new one, and a later run removes the `*.tmp-PID` rest.
"""

import contextlib
import csv
import glob
import json
import os
import re
import shutil
import socket

import tensorflow as tf

from keras_resnext.training.distribute import sum_over_replicas, worker_info
from keras_resnext.training.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded
    fcntl = None

CSV_LOG_NAME = "training_log.csv"
CSV_COLUMNS = ("epoch", "learning_rate", "loss", "top1", "val_loss", "val_top1",
               "val_top5", "images_per_sec", "seconds")
METRICS_NAME = "metrics.json"
LOCK_NAME = ".lock"
EXPORT_RECORD_NAME = "export.json"


def _write_atomically(path, text):
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def _read_metrics(model_dir):
    try:
        with open(os.path.join(model_dir, METRICS_NAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_metrics(model_dir, metrics):
    _write_atomically(os.path.join(model_dir, METRICS_NAME),
                      json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def export_once(model_dir, export_dir, epochs_completed, export):
    """Call `export()`, which writes a SavedModel into `export_dir` and returns
    its path, unless `model_dir` records that it already exported this state
    (`epochs_completed`) there: a rerun of a finished run adds no identical
    version. Returns `(path, exported_now)`.

    Also removes the temporary folders (`.tmp-VERSION-PID`) of exports whose
    process is gone. Without a `model_dir` it always exports.
    """
    _remove_dead_exports(export_dir)
    if model_dir is None or epochs_completed is None:
        return export(), True
    record_path = os.path.join(model_dir, EXPORT_RECORD_NAME)
    with ModelDirLock(model_dir):
        try:
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
        if (record.get("export_dir") == os.path.realpath(export_dir)
                and record.get("epochs_completed") == epochs_completed
                and os.path.isdir(record.get("path", ""))):
            return record["path"], False
        path = export()
        _write_atomically(record_path, json.dumps(dict(
            export_dir=os.path.realpath(export_dir), path=path,
            epochs_completed=epochs_completed), indent=2) + "\n")
        return path, True


def _remove_dead_exports(export_dir):
    for folder in glob.glob(os.path.join(glob.escape(export_dir), ".tmp-*-*")):
        match = re.fullmatch(r"\.tmp-[0-9]+-([0-9]+)", os.path.basename(folder))
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def truncate_csv_log(path, completed_epochs, columns=CSV_COLUMNS):
    """Keep the rows of the epochs a checkpoint holds; a row written just
    before a crash, for an epoch that will be trained again, goes."""
    if not os.path.exists(path):
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= completed_epochs]
    buffer = [",".join(columns)]
    for row in rows:
        buffer.append(",".join(row.get(column, "") for column in columns))
    _write_atomically(path, "\n".join(buffer) + "\n")


def append_csv_row(path, row, columns=CSV_COLUMNS):
    new_file = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new_file:
            writer.writeheader()
        writer.writerow({column: _format_csv_value(row.get(column)) for column in columns})
        f.flush()
        os.fsync(f.fileno())


def _format_csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class ModelDirLock:
    """An advisory lock on a model_dir, so that one run at a time writes there.

    `flock`: the OS releases it when its holder exits or dies, so a lock is
    never stale. The lock file names its holder. Re-entrant within a process,
    so a caller may hold it around `train()` and an export.
    """

    _held = {}  # real path -> [open lock file, depth, whether the lock created the folder]

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.key = os.path.realpath(model_dir)

    def __enter__(self):
        held = self._held.get(self.key)
        if held is not None:
            held[1] += 1
            return self
        created = not os.path.isdir(self.model_dir)
        os.makedirs(self.model_dir, exist_ok=True)
        lock_file = open(os.path.join(self.model_dir, LOCK_NAME), "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock_file.seek(0)
                holder = lock_file.read().strip() or "another process"
                lock_file.close()
                raise UserError(
                    f"{self.model_dir} is in use by another run ({holder}); wait for it to "
                    "end or use another --model_dir.") from None
        lock_file.truncate(0)
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
        self._held[self.key] = [lock_file, 1, created]
        return self

    def __exit__(self, *exc_info):
        held = self._held[self.key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.key]
            held[0].close()  # releases the flock
            if held[2]:
                _remove_if_only_the_lock(self.model_dir)
        return False


def _remove_if_only_the_lock(model_dir):
    """A model_dir the lock created and the run left empty (it failed before
    writing anything) goes again: nothing of a run is lost."""
    with contextlib.suppress(OSError):
        if os.listdir(model_dir) == [LOCK_NAME]:
            os.remove(os.path.join(model_dir, LOCK_NAME))
            os.rmdir(model_dir)


@contextlib.contextmanager
def lock_for_run(model_dir, strategy):
    """The chief holds model_dir's lock for the run; if it cannot, every
    worker stops (the others would wait for it in their first collective)."""
    chief, _, num_workers = worker_info(strategy)
    lock = ModelDirLock(model_dir) if chief else contextlib.nullcontext()
    refused, locked = None, False
    try:
        lock.__enter__()
        locked = True
    except UserError as error:
        refused = error
    try:
        if num_workers > 1 and sum_over_replicas(strategy, [float(not locked)])[0] > 0:
            raise refused or UserError(f"The chief could not lock {model_dir}; see its error.")
        if refused is not None:
            raise refused
        yield
    finally:
        if locked:
            lock.__exit__(None, None, None)


def previous_training_figures(model_dir, csv_path):
    """A rerun's training figures: metrics.json's, or if a kill came before
    it was written, the last CSV row's."""
    previous = _read_metrics(model_dir)
    if previous.get("train_loss") is not None or not os.path.exists(csv_path):
        return previous
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return previous
    figures = {"train_loss": rows[-1]["loss"], "train_top1": rows[-1]["top1"],
               "images_per_sec": rows[-1]["images_per_sec"]}
    return dict(previous, **{name: float(value) for name, value in figures.items() if value})


def create_summary_writers(model_dir):
    """TensorBoard writers for the train and validation curves, in model_dir/logs."""
    return {name: tf.summary.create_file_writer(os.path.join(model_dir, "logs", name))
            for name in ("train", "validation")}


def write_summaries(writers, row, epoch):
    write_scalars(writers["train"], epoch, {
        "epoch_loss": row["loss"], "epoch_top1": row["top1"],
        "learning_rate": row["learning_rate"], "images_per_sec": row["images_per_sec"],
    })
    if "val_top1" in row:
        write_scalars(writers["validation"], epoch, {
            "epoch_loss": row["val_loss"], "epoch_top1": row["val_top1"],
            "epoch_top5": row["val_top5"],
        })


def write_scalars(writer, step, scalars):
    # tf.summary.scalar needs the tensorboard package; tf.summary.write with
    # the scalars plugin's metadata writes the same events without it.
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default(step=step):
        for tag, value in scalars.items():
            tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=metadata)
    writer.flush()
