"""Resource limits applied to every byte read from a file.

A checkpoint may come from anyone. Every size, count and depth it declares is
checked against a :class:`Limits` instance *before* memory is allocated for it.
The defaults are generous for real training checkpoints and small enough that a
hostile file fails fast; set your own when reading untrusted files on a small
machine, or when a legitimate checkpoint is larger than the defaults allow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import LimitExceededError

__all__ = ["DEFAULT_LIMITS", "FILE_SIZE", "Limits", "check_in_file"]

FILE_SIZE = "file_size"  # LimitExceededError.limit when a declared extent runs past the end of its file

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Bounds on what a checkpoint may declare. Pass one as ``limits=`` to any loader.

    Attributes:
        max_header_bytes: size of a safetensors JSON header (the reference reader caps it at 100 MB).
        max_skeleton_bytes: size of the decoded msgpack skeleton of non-tensor values.
        max_depth: nesting depth of values a save accepts. Decoding never recurses in
            Python; msgpack's decoder stops any input nested deeper than 1024.
        max_tensors: number of tensor entries in one file.
        max_components: number of top-level keys of a state.
        max_dims: number of dimensions of one tensor.
        max_container_len: items in one list, tuple, set or dict of the skeleton.
        max_str_len: bytes in one string, bytes value, big integer or inline array.
        max_pickle_stack: values on a legacy pickle's stack at once, those under every
            open MARK included (a tuple of n items needs n).
        max_pickle_marks: MARKs open at once in a legacy pickle (one per container being
            built, so about its nesting depth).
        max_pickle_memo: entries in a legacy pickle's memo.
        max_pickle_work: work a legacy pickle may cost whatever its size, in units of 8
            bytes of a new value or one element hashed, copied or walked (an empty set is 27
            units, a dict entry 5). Reading a pickle may cost ``max_pickle_work +
            max_pickle_work_per_byte * (bytes read so far)``, checked before each
            allocation or walk: memory and time stay proportional to the pickle's size.
        max_pickle_work_per_byte: units of work each byte of a legacy pickle adds to
            ``max_pickle_work``. Real checkpoints use under 4; a flood of 1-byte
            containers would use 27.
        max_inflated_bytes: bytes one compressed zip member may inflate to (checked on its
            declared size and again while inflating).
        max_expansion: how many times the file's size the tensor views of one load may hold in
            all (each view's elements times its item size, counted before it is made): a
            stride-0 view of a few bytes cannot claim gigabytes that a copy, a ``convert`` or
            a ``diff`` would then materialise.
        max_shared_values: values visited again because a container appears at several
            places (a pickle's memo shares it): saving writes a tree, so each place is
            written out, and the report walks of the command line show each place; this
            bounds how far a few shared containers may multiply (a 2**100 blow-up of a
            100-byte pickle). Cycles are never expanded.
        max_equal_hash_keys: keys of one hash that one dict, set, OrderedDict or frozenset
            read from a file (or a legacy pickle's memo) may hold. Keys chosen to collide
            make each insert compare with all the keys of their hash before it; real data
            has almost none (``str``, ``bytes`` and ints under ``2**61 - 1`` are not counted).
    """

    max_header_bytes: int = 100 * MiB
    max_skeleton_bytes: int = 64 * MiB
    max_depth: int = 200
    max_tensors: int = 1_000_000
    max_components: int = 100_000
    max_dims: int = 64
    max_container_len: int = 10_000_000
    max_str_len: int = 64 * MiB
    max_pickle_stack: int = 10_000_000
    max_pickle_marks: int = 10_000
    max_pickle_memo: int = 10_000_000
    max_pickle_work: int = 4 * MiB
    max_pickle_work_per_byte: int = 16
    max_inflated_bytes: int = 256 * MiB
    max_expansion: int = 16
    max_shared_values: int = 1_000_000
    max_equal_hash_keys: int = 64

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {value!r}")
        if self.max_depth > 1000:
            raise ValueError("Limits.max_depth cannot exceed 1000 (the msgpack decoder's own stack)")

    def check(self, name: str, actual: int, *, what: str, file: str | None = None) -> None:
        """Raise :class:`LimitExceededError` when ``actual`` is over the bound called ``name``."""
        maximum = getattr(self, name)
        if actual > maximum:
            raise LimitExceededError(
                f"{what} is {actual}, over the limit Limits.{name}={maximum}; "
                f"pass limits=Limits({name}=...) to read it if you trust this file",
                limit=name,
                maximum=maximum,
                actual=actual,
                file=file,
            )


DEFAULT_LIMITS = Limits()


def check_in_file(end: int, size: int, what: Callable[[], str], *, file: str | None = None) -> None:
    """Raise :class:`LimitExceededError` (``limit="file_size"``) when the extent ``what()`` describes,
    declared to end at byte ``end``, runs past the ``size`` bytes that hold it: a bound the file
    sets, not ``Limits``. ``what`` is called only then (the check runs once per tensor)."""
    if end > size:
        raise LimitExceededError(
            f"{what()} runs past the end: it needs {end} bytes of the {size} there are",
            limit=FILE_SIZE,
            maximum=size,
            actual=end,
            file=file,
        )
