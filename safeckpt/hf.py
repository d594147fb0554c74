"""Hugging Face model folders: ``pytorch_model.bin`` (or its shards) to ``model.safetensors``, never unpickling.

:func:`convert_folder` reads the legacy weights with safeckpt's no-execution
pickle reader and writes the layout ``transformers`` writes with
``save_pretrained``:

- ``model.safetensors``, or shards ``model-0000X-of-0000N.safetensors`` with
  ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``);
- ``{"format": "pt"}`` as each file's safetensors metadata;
- the shard split of the source (``pytorch_model.bin.index.json``), or a new
  split by ``max_shard_size``;
- tensors that share storage (tied weights) stored once, under the name that
  comes first in the source (the input embedding, which ``save_pretrained``
  keeps; ``from_pretrained`` ties the others back).

Neither ``transformers`` nor ``huggingface_hub`` is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import CheckpointFormatError, UnsupportedValueError
from .storage import atomic_path, atomic_write
from .legacy import read_torch_file
from .limits import DEFAULT_LIMITS, Limits
from .loading import load_single_file
from .saving import save_single_file

__all__ = ["TRAINER_FILES", "convert_folder", "parse_size"]

logger = logging.getLogger("safeckpt")

LEGACY_WEIGHTS = "pytorch_model.bin"
LEGACY_INDEX = "pytorch_model.bin.index.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "training_args.bin", "scaler.pt")
_RNG_STATE = re.compile(r"rng_state(_[0-9]+)?\.pth\Z")
CONVERTED_RECORD = "safeckpt_converted.json"
MAX_INDEX_BYTES = 64 << 20
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B?)\s*\Z", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``1000`` -> 1000 (as ``transformers`` reads sizes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"a shard size must be positive, got {size}")
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ValueError(f"not a size: {size!r} (use e.g. 5GB, 500MiB or a number of bytes)")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I") or ""]
    value = int(number * base**power)
    if value <= 0:
        raise ValueError(f"a shard size must be positive, got {size!r}")
    return value


def _plain_name(folder: Path, name: Any, where: str) -> Path:
    if type(name) is not str or not name or name in (".", "..") or Path(name).name != name or "\0" in name:
        raise CheckpointFormatError(f"{where} names {name!r:.200}, which is not a file in {folder}; refused",
                                    file=where)
    return folder / name


def _legacy_shards(src: Path) -> list[tuple[Path, list[str] | None]]:
    """The legacy weight files in order, each with the names the index gives it (``None``: no index)."""
    index = src / LEGACY_INDEX
    if index.is_file():
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointFormatError(f"{index} is over {MAX_INDEX_BYTES} bytes: not an index", file=str(index))
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError, UnicodeError) as exc:
            raise CheckpointFormatError(f"{index} is not a weight index: {exc}", file=str(index)) from exc
        if type(weight_map) is not dict:
            raise CheckpointFormatError(f"{index}: weight_map is not an object", file=str(index))
        shards: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            _plain_name(src, file, str(index))
            shards.setdefault(file, []).append(name)
        return [(src / f, names) for f, names in sorted(shards.items())]
    if (src / LEGACY_WEIGHTS).is_file():
        return [(src / LEGACY_WEIGHTS, None)]
    raise FileNotFoundError(2, f"no {LEGACY_WEIGHTS} or {LEGACY_INDEX} in the folder", str(src))


def _read_shard(path: Path, names: list[str] | None, limits: Limits) -> dict[str, torch.Tensor]:
    state = read_torch_file(path, device=torch.device("cpu"), limits=limits).value
    if not isinstance(state, Mapping):
        raise UnsupportedValueError(f"{path} holds a {type(state).__name__}, not a state dict",
                                    path_in_state="state", value_type=type(state).__qualname__)
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if type(name) is not str or not isinstance(value, torch.Tensor):
            raise UnsupportedValueError(
                f"{path}: entry {name!r:.100} is a {type(value).__name__}, not a tensor named by a str",
                path_in_state=f"state[{name!r:.100}]", value_type=type(value).__qualname__,
            )
        out[name] = value.detach()
    if names is not None and sorted(names) != sorted(out):
        extra, missing = sorted(set(out) - set(names)), sorted(set(names) - set(out))
        raise CheckpointFormatError(
            f"{path} does not hold what {LEGACY_INDEX} says (missing {missing[:5]}, not indexed {extra[:5]})",
            file=str(path),
        )
    return out


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    storage = t.untyped_storage()
    return (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else None


def _dedupe(shards: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Tensors that share storage: an identical view is kept once, under its first name; other views get copies."""
    seen: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
    out: list[dict[str, torch.Tensor]] = []
    for shard in shards:
        kept: dict[str, torch.Tensor] = {}
        for name, t in shard.items():
            key = _storage_key(t)
            group = seen.setdefault(key, []) if key is not None else []
            same = [n for n, o in group if (o.data_ptr(), o.shape, o.stride(), o.dtype) ==
                    (t.data_ptr(), t.shape, t.stride(), t.dtype)]
            if same:
                logger.info("%s shares its storage with %s: stored once, as save_pretrained does", name, same[0])
                continue
            shared = bool(group) or (key is not None and t.numel() * t.element_size() != key[1])
            group.append((name, t))
            kept[name] = t.clone() if shared or not t.is_contiguous() else t
        out.append(kept)
    return out


def _resplit(shards: list[dict[str, torch.Tensor]], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """A new split in source order, as ``transformers`` does: a shard closes when the next tensor would overflow it."""
    out: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in ((n, t) for shard in shards for n, t in shard.items()):
        nbytes = t.numel() * t.element_size()
        if out[-1] and size + nbytes > max_bytes:
            out.append({})
            size = 0
        out[-1][name] = t
        size += nbytes
    return out


def _write_weights(shards: list[dict[str, torch.Tensor]], dst: Path) -> list[Path]:
    shards = [s for s in shards if s]
    if len(shards) == 1:
        with atomic_path(dst / SAFE_WEIGHTS) as temp:
            save_file(shards[0], temp, metadata={"format": "pt"})
        return [dst / SAFE_WEIGHTS]
    written, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(dst / name) as temp:
            save_file(shard, temp, metadata={"format": "pt"})
        written.append(dst / name)
        for tensor_name, t in shard.items():
            weight_map[tensor_name] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    written.append(atomic_write(dst / SAFE_INDEX, lambda f: f.write(text)))
    return written


def _is_trainer_file(name: str) -> bool:
    return name in TRAINER_FILES or bool(_RNG_STATE.match(name))


def _convert_trainer_file(src: Path, dst_dir: Path, allowed_globals: Iterable[Any], limits: Limits) -> dict[str, Any]:
    value = load_single_file(src, allowed_globals=allowed_globals, limits=limits)
    wrapped = None if isinstance(value, Mapping) else src.stem
    target = dst_dir / (src.stem + ".safetensors")
    save_single_file(None, value if wrapped is None else {wrapped: value}, target)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    return {"file": target.name, "source": src.name, "source_sha256": digest, "wrapped_in": wrapped}


def convert_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    max_shard_size: int | str | None = None,
    remove_legacy: bool = False,
    trainer_files: bool = False,
    overwrite: bool = False,
    allowed_globals: Iterable[Any] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> list[Path]:
    """Convert a Hugging Face model folder to the safetensors layout, without unpickling anything.

    Args:
        src: the folder with ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` and its shards.
        dst: the folder to write (default: ``src`` itself). Every other file and subfolder
            of ``src`` (config, tokenizer) is copied untouched; symlinks are skipped. The
            converted legacy files are not copied to a new ``dst``.
        max_shard_size: split into shards of at most this many bytes (``"5GB"``, ``"500MiB"``)
            instead of keeping the source's split.
        remove_legacy: in place (``dst`` is ``src``), delete the converted legacy files once
            everything is written.
        trainer_files: also convert a Trainer checkpoint's ``optimizer.pt``, ``scheduler.pt``,
            ``scaler.pt``, ``rng_state*.pth`` and ``training_args.bin`` to ``<stem>.safetensors``
            safeckpt files beside them, recorded (with their source names and digests) in
            ``safeckpt_converted.json``. A non-dict value is stored under its file's stem.
        overwrite: replace existing ``model*.safetensors`` outputs.
        allowed_globals: names to import while reading Trainer files (inert references convert anyway).
        limits: bounds on what the legacy files may declare.

    Returns:
        The files written (weights, index, converted Trainer files and their record).

    Raises:
        FileNotFoundError: if ``src`` has no legacy weights.
        FileExistsError: if the outputs exist and ``overwrite`` is not set.
        UnsafeCheckpointError: if a legacy file names a dangerous global; nothing is written.
        CheckpointFormatError: if the index and the shards disagree, or a file is malformed.
    """
    source = Path(src)
    target = Path(dst) if dst is not None else source
    in_place = target.resolve() == source.resolve() if target.exists() else False
    if not source.is_dir():
        raise FileNotFoundError(2, "No such folder", str(source))
    if remove_legacy and not in_place:
        raise ValueError("remove_legacy deletes the converted legacy files of a conversion in place (dst is src); "
                         "a conversion to a new folder never touches the source")
    legacy = _legacy_shards(source)
    existing = [p for p in (target.glob("model*.safetensors*") if target.is_dir() else [])
                if p.name == SAFE_WEIGHTS or p.name == SAFE_INDEX or re.match(r"model-\d+-of-\d+\.safetensors\Z", p.name)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True (--overwrite) to replace it")
    shards = [_read_shard(path, names, limits) for path, names in legacy]  # everything is read before writing
    shards = _dedupe(shards)
    if max_shard_size is not None:
        shards = _resplit(shards, parse_size(max_shard_size))
    target.mkdir(parents=True, exist_ok=True)
    for old in existing:
        old.unlink()
    converted = {p.name for p, _ in legacy} | ({LEGACY_INDEX} if (source / LEGACY_INDEX).is_file() else set())
    trainer = sorted(p for p in source.iterdir() if trainer_files and p.is_file() and _is_trainer_file(p.name))
    written = _write_weights(shards, target)
    records = [_convert_trainer_file(p, target, allowed_globals, limits) for p in trainer]
    if records:
        document = {"format": "safeckpt-hf-trainer", "files": records}
        text = (json.dumps(document, indent=2) + "\n").encode()
        written += [target / r["file"] for r in records] + [atomic_write(target / CONVERTED_RECORD,
                                                                         lambda f: f.write(text))]
    converted |= {p.name for p in trainer}
    if not in_place:
        _copy_others(source, target, skip=converted | {p.name for p in written})
    elif remove_legacy:
        for name in sorted(converted):
            (source / name).unlink()
    return written


def _copy_others(source: Path, target: Path, skip: set[str]) -> None:
    inside = target.resolve()
    for entry in sorted(source.iterdir()):
        if entry.name in skip or inside.is_relative_to(entry.resolve()):  # a DST_DIR inside SRC_DIR is not copied
            continue
        if entry.is_symlink():
            logger.warning("%s is a symlink: not copied", entry)
        elif entry.is_dir():
            shutil.copytree(entry, target / entry.name, symlinks=True, dirs_exist_ok=True,
                            ignore=lambda d, names: [n for n in names if os.path.islink(os.path.join(d, n))])
        elif entry.is_file():
            shutil.copy2(entry, target / entry.name)
