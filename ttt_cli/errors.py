"""Error types that the CLI maps to exit codes (SPEC §5, §7)."""


class TTTError(Exception):
    """Base class: a one-paragraph message for the user, no traceback unless --debug.

    Args:
        message: what is wrong (and, in a sentence, what to do).
        hint: the next step in a few words, for `--json` error objects (default: the class's).
    """

    exit_code = 2
    default_hint = "fix the option or file named in the message; `ttt COMMAND --help` lists the options"

    def __init__(self, message: str = "", hint: str | None = None):
        super().__init__(message)
        self.hint = hint or self.default_hint


class ConfigError(TTTError):
    """A usage, option, config or checkpoint problem (exit 2)."""


class CheckpointError(TTTError):
    """A missing, inconsistent or unreachable checkpoint (exit 2)."""

    default_hint = "check --model: `--model tiny` runs offline; `ttt init-checkpoint` writes a checkpoint"


class StateMismatchError(TTTError):
    """A fast-weight snapshot that does not fit the model (exit 2)."""

    default_hint = "use a snapshot taken with this model (`ttt inspect-state FILE --model M` says why it does not fit)"


class OutputError(TTTError):
    """An output path that may not be written: it is an input, or a file this tool did not write (exit 2)."""

    default_hint = "choose another output path"


class WriteError(TTTError):
    """Writing failed part-way (disk full, read-only, permission): finished outputs are kept (exit 1).

    Args:
        detail: the OS error in words (path and reason), for the accounting of the inputs not run.
    """

    exit_code = 1
    default_hint = "free some space or write elsewhere, then run again on the inputs reported as not run"

    def __init__(self, message: str = "", hint: str | None = None, detail: str | None = None):
        super().__init__(message, hint)
        self.detail = detail or message

    @classmethod
    def unit_removed(cls, detail: str, input_path) -> "WriteError":
        """One input's outputs failed to write and were removed again."""
        return cls(f"{detail}. The outputs of {input_path} were removed again; outputs already finished stay.",
                   detail=detail)


class InputError(TTTError):
    """One input (audio file) is unusable; commands skip it and exit 1 at the end."""

    exit_code = 1
    default_hint = "the input is reported and skipped; fix or remove it"


class LoadWarning(UserWarning):
    """Something about a loaded checkpoint the user must know (also in `TTTModel.warnings`, which the
    commands print; the CLI silences the Python warning so that each is said once)."""
