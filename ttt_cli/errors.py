"""Error types that the CLI maps to exit codes (SPEC §5, §7)."""


class TTTError(Exception):
    """Base class: a one-paragraph message for the user, no traceback unless --debug."""

    exit_code = 2


class ConfigError(TTTError):
    """A usage, option, config or checkpoint problem (exit 2)."""


class CheckpointError(TTTError):
    """A missing, inconsistent or unreachable checkpoint (exit 2)."""


class StateMismatchError(TTTError):
    """A fast-weight snapshot that does not fit the model (exit 2)."""


class InputError(TTTError):
    """One input (audio file) is unusable; commands skip it and exit 1 at the end."""

    exit_code = 1


class LoadWarning(UserWarning):
    """Something about a loaded checkpoint the user must know (also in `TTTModel.warnings`, which the
    commands print; the CLI silences the Python warning so that each is said once)."""
