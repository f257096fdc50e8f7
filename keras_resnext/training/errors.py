"""The errors a run reports to people: one line each, no traceback."""


class UserError(Exception):
    """A problem the user can fix (a flag, a path, the data); the CLIs print
    its message as one line and exit non-zero."""


class TrainingDiverged(UserError):
    """The loss stopped being finite."""


def first_line(error):
    """The first line of `error`'s message, or its type's name if it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def diverged(what, checkpoint_dir, warmup_flag="--warmup_epochs"):
    """`warmup_flag`: the calling CLI's warmup flag, named in the hint."""
    return TrainingDiverged(
        f"Training stopped: {what}. The last good checkpoint is in {checkpoint_dir}; "
        f"lower --lr or add {warmup_flag}."
    )
