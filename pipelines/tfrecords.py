"""TFRecord files at the level of their framing: counting records from the
length headers, and reading a file's records up to its first corrupt one,
with the count of those read reported to the pipeline's bookkeeping.
"""

import functools
import struct

import tensorflow as tf


def keyed_tfrecords(path, num_records, unreadable):
    """`(key, record)` of one file, up to its first corrupt record.

    tf.data's reader fails there (DataLossError) and goes no further in that
    file; `ignore_errors` ends the file's stream at the failure. A marker after
    the stream, numbered like a record, tells `unreadable` how many of
    `num_records` were read. (Zip and enumerate add little per record; a scan
    that counted them would cost as much as the filter.)
    """
    records = tf.data.TFRecordDataset(path).ignore_errors()
    not_end = tf.data.Dataset.from_tensors(False).repeat()
    end_of_file = tf.data.Dataset.from_tensors((tf.constant(""), True))
    numbered = tf.data.Dataset.zip(records, not_end).concatenate(end_of_file).enumerate()

    def is_record(index, record_and_end):
        def note_records_read():
            # The marker's index is the number of records read.
            with tf.control_dependencies([unreadable.file_read(path, index, num_records)]):
                return tf.constant(False)

        return tf.cond(record_and_end[1], note_records_read, lambda: tf.constant(True))

    return numbered.filter(is_record).map(
        lambda index, record_and_end: (
            tf.strings.join([path, " record ", tf.strings.as_string(index)]),
            record_and_end[0],
        )
    )


def count_tfrecords(path):
    """Records in a TFRecord file, read from the length headers alone."""
    stat = tf.io.gfile.stat(path)
    return _count_tfrecords(path, stat.length, stat.mtime_nsec)


@functools.lru_cache(maxsize=None)
def _count_tfrecords(path, length, mtime_nsec):
    del mtime_nsec  # Part of the cache key only.
    # Each record is: uint64 length, uint32 CRC, data, uint32 CRC.
    # Without its lengths the file's count is unknown: that stops the run,
    # where a corrupt record's data (see `keyed_tfrecords`) does not.
    count = 0
    offset = 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while offset < length:
            f.seek(offset)
            header = f.read(8)
            record_end = length + 1  # past the end, unless the header is whole
            if len(header) == 8:
                record_end = offset + 8 + 4 + struct.unpack("<Q", header)[0] + 4
            if record_end > length:
                raise ValueError(
                    f"TFRecord file {path} ends inside record {count} (at byte {offset}): "
                    "the file is truncated or the record's length is corrupt."
                )
            offset = record_end
            count += 1
    return count
