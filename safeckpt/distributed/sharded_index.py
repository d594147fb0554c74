"""The index of a sharded checkpoint (``safeckpt-sharded.msgpack``): writing it, and reading it back
checked against the shard files it names.

The index is an ordinary safeckpt file encoded by rank 0: ``format``,
``format_version``, ``world_size``, ``shards`` (``[name, size]`` per shard
file: a :class:`~safeckpt.storage.FileRecord` without a digest), ``tensors``
(``[place, key, dtype, shape]`` per tensor: a :class:`~.tree.Slot`) and
``state`` (the skeleton). Before anything is allocated or handed to DCP, the
shard directory must hold exactly the recorded files at their sizes, and the
shards' chunks must tile every tensor of the table.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..checkpoint import Checkpoint
from ..container import encode_state, read_header, skeleton_file_bytes, write_single
from ..errors import CheckpointFormatError, IntegrityError
from ..limits import DEFAULT_LIMITS, Limits
from ..storage import FileRecord, LocalStorage, unmatched
from ..tensors import check_dims
from ..text import show
from .tree import Slot

__all__ = ["FORMAT", "FORMAT_VERSION", "META_NAME", "SHARD_DIR", "document", "index_writer", "read_index", "shard_records"]

META_NAME = "safeckpt-sharded.msgpack"
SHARD_DIR = "safeckpt-shards"
FORMAT = "safeckpt-sharded"
FORMAT_VERSION = 1
_SHARD_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.safetensors\Z")
_SHARDING_INFO = "DCP_SHARDING_INFO"  # a shard's __metadata__ key: JSON {key: {"saved_offsets": [...]}} (DCP's hf_storage)


# --------------------------------------------------------------------------- writing


def document(skeleton: Any, slots: list[Slot], world_size: int, shards: list[FileRecord]) -> dict[str, Any]:
    """The index of a checkpoint whose shard files are ``shards`` (none yet: the dry run before saving)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "world_size": world_size,
        "shards": [[record.name, record.size] for record in shards],
        "tensors": [[slot.path, slot.key, slot.dtype, list(slot.shape)] for slot in slots],
        "state": skeleton,
    }


def index_writer(doc: dict[str, Any]) -> Callable[[BinaryIO], Any]:
    """Encode ``doc`` now (raising on a value the format cannot hold) and return what writes it to a file."""
    encoded = encode_state(doc, DEFAULT_LIMITS)
    if encoded.entries:  # tensors hidden inside objects: the index becomes a single safeckpt file
        return partial(write_single, encoded=encoded)
    raw = skeleton_file_bytes(encoded)
    return lambda f: f.write(raw)


def shard_records(root: Path) -> list[FileRecord]:
    """The shard files DCP wrote under ``root``, by name."""
    shard_dir = root / SHARD_DIR
    return sorted(
        (FileRecord(f.name, f.stat().st_size) for f in shard_dir.iterdir() if f.suffix == ".safetensors"),
        key=lambda record: record.name,
    )


# --------------------------------------------------------------------------- reading


def _bad(root: Path, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{root / META_NAME}: {message}", file=str(root / META_NAME))


def _bad_shard(path: Path, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {message}", file=str(path))


def read_index(root: Path, allowed_globals: Iterable[Any], limits: Limits) -> tuple[Any, list[Slot]]:
    """The skeleton and tensor table of the checkpoint in ``root``, checked against its shard files.

    Raises:
        FileNotFoundError: if ``root`` holds no committed sharded checkpoint.
        IntegrityError: if the shard files are not exactly those recorded.
        CheckpointFormatError: if the index or a shard is corrupt, or the chunks do not tile the tensors.
        LimitExceededError: if a tensor's declared shape exceeds ``limits``.
    """
    meta = root / META_NAME
    if not meta.is_file():
        raise FileNotFoundError(f"{root} is not a complete sharded safeckpt checkpoint: {meta} is missing")
    source = LocalStorage(root).open(META_NAME)  # never through a link: its target is outside the checkpoint
    with Checkpoint(meta, allowed_globals=allowed_globals, limits=limits, source=source) as ckpt:
        doc = ckpt.load()
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or type(doc.get("format_version")) is not int:
        raise _bad(root, "not a safeckpt sharded checkpoint index")
    if doc["format_version"] > FORMAT_VERSION:
        raise _bad(root, f"format version {doc['format_version']}; this safeckpt reads up to {FORMAT_VERSION}, upgrade it")
    shards, table = doc.get("shards"), doc.get("tensors")
    if type(shards) is not list or type(table) is not list or "state" not in doc:
        raise _bad(root, "malformed sharded checkpoint index")
    expected: dict[str, FileRecord] = {}
    for item in shards:
        if not (type(item) is list and len(item) == 2 and type(item[0]) is str and _SHARD_FILE.match(item[0]) and type(item[1]) is int):
            raise _bad(root, f"malformed shard entry {show(item, 200)}")
        if item[0] in expected:
            raise _bad(root, f"shard {item[0]!r} is listed twice")
        expected[item[0]] = FileRecord(item[0], item[1])
    slots = []
    paths: set[tuple[Any, ...]] = set()
    keys: set[str] = set()
    for item in table:
        if not (
            type(item) is list and len(item) == 4 and type(item[0]) is tuple and _hashable(item[0]) and type(item[1]) is str
            and isinstance(item[2], torch.dtype) and type(item[3]) is list and all(type(n) is int and n >= 0 for n in item[3])
        ):
            raise _bad(root, f"malformed tensor entry {show(item, 200)}")
        if item[0] in paths or item[1] in keys:
            raise _bad(root, f"two tensor entries share the place {show(item[0], 200)} or the key {item[1]!r:.200}")
        paths.add(item[0])
        keys.add(item[1])
        check_dims(item[3], what=f"tensor {item[1]!r:.200}", limits=limits, file=str(meta))  # torch.zeros can make it
        slots.append(Slot(item[0], item[1], item[2], tuple(item[3])))
    _check_shards(root, list(expected.values()))
    _check_chunks(root, sorted(expected), slots, limits)
    return doc["state"], slots


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _check_shards(root: Path, expected: list[FileRecord]) -> None:
    """The shard directory holds exactly the recorded files, as regular files (never links), at their
    recorded sizes (DCP's reader reads every one)."""
    shard_dir = root / SHARD_DIR
    listing = LocalStorage(root).child(SHARD_DIR).listdir()  # links and special files are left out: "missing"
    found = {name: size for name, size in listing.items() if size is not None and name.endswith(".safetensors")}
    changed, extra = unmatched(expected, found)
    if changed or extra:
        missing = sorted(record.name for record in changed if record.name not in found)
        resized = sorted(record.name for record in changed if record.name in found)
        raise IntegrityError(
            f"{shard_dir} does not match {root / META_NAME}: missing {missing}, unexpected {extra}, resized {resized}",
            file=str(shard_dir),
        )


def _check_chunks(root: Path, shards: list[str], slots: list[Slot], limits: Limits) -> None:
    """Every shard is a valid safetensors file whose chunks lie inside tensors of the table, and
    together they hold each tensor's every element (at least one chunk per tensor, their element
    counts add up to the tensor's, they reach its far corner, no two that hold elements start at
    the same place).

    Done before DCP reads the shards or anything is allocated: the table's shapes are then backed
    by bytes on disk (no allocation bomb), and DCP meets no malformed file.
    """
    table = {slot.key: slot for slot in slots}
    chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {key: [] for key in table}
    for name in shards:
        path = root / SHARD_DIR / name
        header = read_header(path, limits)
        offsets = _sharding_info(path, header.metadata)
        for key, info in header.entries.items():
            slot, offset = table.get(key), offsets.get(key)
            if slot is None or offset is None:
                raise _bad_shard(path, f"tensor {key!r:.200} is not in the checkpoint's table or has no saved offsets")
            if info.dtype != slot.dtype or len(offset) != len(slot.shape) or len(info.shape) != len(slot.shape) or any(
                o + n > g for o, n, g in zip(offset, info.shape, slot.shape)
            ):
                raise _bad_shard(path, f"chunk of {key!r:.200} ({info.dtype}, {list(info.shape)} at {offset}) does not fit "
                                       f"the tensor ({slot.dtype}, {list(slot.shape)})")
            chunks[key].append((tuple(offset), info.shape))
    for key, pieces in chunks.items():
        shape = table[key].shape
        elements = sum(math.prod(size) for _, size in pieces)
        reach = tuple(max(column) for column in zip(*(_ends(o, n) for o, n in pieces)))
        if not pieces:
            problem = "no shard holds any of it"
        elif elements != math.prod(shape):
            problem = f"its chunks hold {elements} of its {math.prod(shape)} elements ({list(shape)})"
        elif reach != shape:
            problem = f"its chunks reach {list(reach)}, not its far corner {list(shape)}"
        elif len(starts := [o for o, n in pieces if math.prod(n)]) != len(set(starts)):  # empty chunks cover nothing
            problem = "two of its chunks start at the same offset"
        else:
            continue
        raise CheckpointFormatError(f"{root / SHARD_DIR}: tensor {key!r:.200}: {problem}", file=str(root / SHARD_DIR))


def _ends(offset: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(o + n for o, n in zip(offset, size))


def _sharding_info(path: Path, metadata: dict[str, str]) -> dict[str, list[int]]:
    """The shard's saved offsets per tensor key, validated."""
    try:
        info = json.loads(metadata[_SHARDING_INFO])
    except (KeyError, ValueError, RecursionError) as exc:
        raise _bad_shard(path, f"no valid {_SHARDING_INFO} in its metadata") from exc
    if type(info) is not dict:
        raise _bad_shard(path, f"{_SHARDING_INFO} is not a JSON object")
    out = {}
    for key, value in info.items():
        offset = value.get("saved_offsets") if type(value) is dict else None
        if type(offset) is not list or not all(type(o) is int and o >= 0 for o in offset):
            raise _bad_shard(path, f"malformed saved offsets for {key!r:.200} in {_SHARDING_INFO}")
        out[key] = offset
    return out
