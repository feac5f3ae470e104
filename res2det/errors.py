"""User-facing errors: the CLI prints their message and exits with code 2, without a traceback."""


class Res2DetError(Exception):
    """A problem with the user's input (file, checkpoint, config value, model name)."""


class CheckpointError(Res2DetError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(Res2DetError):
    """A dataset file (annotations, image, label map) that is missing, unreadable or malformed."""


class Res2DetWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""
