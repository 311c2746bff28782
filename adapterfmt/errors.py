"""One exception hierarchy. Every message names the file (or module) and says what to do.

The CLI turns these into one line on stderr and the exit code below; nothing else
should ever reach the user as a traceback.
"""
from __future__ import annotations

EXIT_INVALID = 1  # the input was read but is not a valid/consistent adapter
EXIT_USAGE = 2  # bad arguments, unreadable input, I/O failure


class AdapterFmtError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for it."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.hint = hint
        self.message = message
        super().__init__(f"{message}; {hint}" if hint else message)

    def one_line(self) -> str:
        """The message as the CLI prints it: ``path: message; what to do``."""
        text = str(self)
        if self.path and not text.startswith(self.path):
            text = f"{self.path}: {text}"
        return " ".join(text.split())


class UsageError(AdapterFmtError):
    """Bad arguments or an unsupported request."""


class InputIOError(AdapterFmtError):
    """An input cannot be read or an output cannot be written."""


class HeaderError(AdapterFmtError):
    """The container is not a well-formed safetensors file."""

    exit_code = EXIT_INVALID


class VersionError(AdapterFmtError):
    """The file declares a format major version this reader does not know."""

    exit_code = EXIT_INVALID


class ManifestError(AdapterFmtError):
    """The manifest is missing, not valid JSON, fails the schema, or contradicts the tensors."""

    exit_code = EXIT_INVALID


class TensorError(AdapterFmtError):
    """A tensor is missing, extra, of the wrong shape/dtype, or holds NaN/Inf."""

    exit_code = EXIT_INVALID


class BaseMismatchError(AdapterFmtError):
    """The adapter does not belong to the given base model (names, shapes, fingerprints)."""

    exit_code = EXIT_INVALID


class UnknownMethodError(AdapterFmtError):
    """The manifest names a method this version does not implement."""

    exit_code = EXIT_INVALID


class ForeignFormatError(AdapterFmtError):
    """A foreign adapter (PEFT, GGUF, ...) cannot be read or written faithfully."""

    exit_code = EXIT_INVALID


class LossyConversionError(AdapterFmtError):
    """A conversion would lose information and --strict was given."""

    exit_code = EXIT_INVALID


class PickleRefusedError(AdapterFmtError):
    """A pickle-based file was given without --allow-pickle."""
