"""Every exception and warning safeckpt raises.

The hierarchy::

    SafeCkptError
    ├── CheckpointFormatError (also ValueError)   bytes that are not a valid checkpoint
    │   └── LimitExceededError                    a declared size or count over a Limits bound
    ├── UnsafeCheckpointError                     a legacy file that references dangerous code
    ├── UnsupportedValueError (also TypeError)    a value the safe format cannot hold
    ├── IntegrityError                            stored digests do not match the bytes
    │   └── SignatureError                        a signature that does not verify or cover the checkpoint
    └── ComponentNotFoundError (also KeyError)    a component or tensor that is not there

    FallbackWarning (UserWarning)                 format="auto" fell back to torch.save

Every error carries structured attributes so that no caller has to parse a
message: ``path_in_state``, ``global_name``, ``limit``, ``actual``, ``tensor_name``
and ``file``, each ``None`` when it does not apply.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CheckpointFormatError",
    "ComponentFileMissingError",
    "ComponentNotFoundError",
    "FallbackWarning",
    "IntegrityError",
    "LimitExceededError",
    "SafeCkptError",
    "SignatureError",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
]


class SafeCkptError(Exception):
    """Base class of every error safeckpt raises on purpose."""

    def __init__(self, message: str = "", *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class CheckpointFormatError(SafeCkptError, ValueError):
    """The bytes are not a well-formed checkpoint of a format safeckpt reads.

    Attributes:
        file: the file being read, when known.
        offset: byte offset of the problem, when known.
    """

    def __init__(self, message: str = "", *, file: str | None = None, offset: int | None = None) -> None:
        super().__init__(message, file=file)
        self.offset = offset


class LimitExceededError(CheckpointFormatError):
    """A size, count or depth in the input exceeds a :class:`~safeckpt.Limits` bound.

    Attributes:
        limit: the name of the ``Limits`` field that was exceeded, or ``"file_size"`` when a
            declared size runs past the end of the file (a 10-byte file claiming a terabyte).
        maximum: the bound in force.
        actual: the value found (or at least how far past the bound reading got).
    """

    def __init__(
        self,
        message: str = "",
        *,
        limit: str | None = None,
        maximum: int | None = None,
        actual: int | None = None,
        file: str | None = None,
    ) -> None:
        super().__init__(message, file=file)
        self.limit = limit
        self.maximum = maximum
        self.actual = actual


class UnsafeCheckpointError(SafeCkptError):
    """A legacy file references code that safeckpt refuses to even name.

    Attributes:
        globals: the offending ``"module:qualname"`` names, sorted.
    """

    def __init__(self, message: str = "", *, globals: Sequence[str] = (), file: str | None = None) -> None:
        super().__init__(message, file=file)
        self.globals = tuple(globals)

    @property
    def global_name(self) -> str | None:
        """The first offending global, for callers that handle one at a time."""
        return self.globals[0] if self.globals else None


class UnsupportedValueError(SafeCkptError, TypeError):
    """A value in the state cannot be stored in the safe format.

    Attributes:
        path_in_state: where the value sits, e.g. ``"state['loss_fn']"``.
        value_type: the qualified name of the value's type.
    """

    def __init__(
        self, message: str = "", *, path_in_state: str | None = None, value_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.path_in_state = path_in_state
        self.value_type = value_type


class IntegrityError(SafeCkptError):
    """Stored SHA-256 digests do not match the bytes read.

    Attributes:
        tensor_name: the tensor (or ``"<skeleton>"``) whose digest differs.
        expected: the recorded digest (hex).
        actual: the digest of the bytes read (hex).
    """

    def __init__(
        self,
        message: str = "",
        *,
        tensor_name: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
        file: str | None = None,
    ) -> None:
        super().__init__(message, file=file)
        self.tensor_name = tensor_name
        self.expected = expected
        self.actual = actual


class ComponentFileMissingError(IntegrityError, FileNotFoundError):
    """A manifest lists a component whose file is not there: a torn or modified set.

    Both a :class:`SafeCkptError` (the manifest's bytes name the file: callers that catch
    safeckpt's errors for untrusted sets catch it) and the standard ``FileNotFoundError``
    (``errno``, ``filename``) a missing file is.

    Attributes:
        tensor_name: the component's key.
        file: the missing file, as shown (also ``filename``).
    """

    def __init__(self, message: str = "", *, tensor_name: str | None = None, file: str | None = None) -> None:
        super().__init__(message, tensor_name=tensor_name, file=file)
        self.errno, self.strerror, self.filename = errno.ENOENT, message, file


class SignatureError(IntegrityError):
    """A checkpoint's signature is malformed, does not verify, or does not cover what would be read.

    Attributes:
        file: the file concerned (the signature, or a signed file).
    """


class ComponentNotFoundError(SafeCkptError, KeyError):
    """A component or tensor name that the checkpoint does not contain.

    Attributes:
        name: the key that was asked for.
        available: the keys that exist, for the message and for callers.
    """

    def __init__(self, message: str = "", *, name: Any = None, available: Sequence[Any] = (), file: str | None = None) -> None:
        super().__init__(message, file=file)
        self.name = name
        self.available = tuple(available)

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FallbackWarning(UserWarning):
    """``format="auto"`` wrote a ``torch.save`` file because the state holds a value the safe format cannot."""
