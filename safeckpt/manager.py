"""``CheckpointManager``: numbered checkpoints of a training run, committed atomically.

Layout of ``directory`` (a local path or any fsspec URL, see :mod:`safeckpt.storage`)::

    step_000000001200/
        WRITING                        {"pid", "host", "started"}: written first, removed after the commit
        checkpoint.safeckpt            a single file (``checkpoint.pt`` for format="torch")
          or checkpoint_<key>.*  +  checkpoint.safeckpt.json   a multi-file set (multi=True)
        COMMITTED                      JSON written last: the commit point

``COMMITTED`` records the step, its metrics, the layout, and every file with
its size and SHA-256 (as a multi-file manifest does). A step is *complete* when
its marker is valid JSON naming that step; everything the manager knows
(steps, metrics, best) is read back from the markers, so there is no index to
lose and a new manager on the same directory carries on where an old one died.

Incomplete steps (no valid marker) are ignored by :meth:`~CheckpointManager.latest`
and :meth:`~CheckpointManager.restore` and deleted, when the manager is created
and after each commit, if either:

- their step is older than the newest complete step (no writer will finish it), or
- their ``WRITING`` lock names this host and a process that is gone (or this
  process, when it is not the save in flight).

Other incomplete steps may belong to a live writer and are left alone. Saving a
step replaces an incomplete directory of the same step. One writer process per
directory is assumed (on several ranks, save on one).

Retention keeps the union of the ``max_to_keep`` newest and the ``keep_best``
best complete steps, and always the newest one; incomplete steps are never
retention candidates. A step is deleted marker first, so a crash mid-delete
leaves an incomplete step, cleaned up later, never a torn "complete" one.

Inside ``directory`` the manager never follows a link (a planted symlinked
step directory is neither listed, written into, nor deleted through), and
opens only regular files (:mod:`safeckpt.storage.local`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from .container import Encoded
from .errors import CheckpointFormatError, IntegrityError
from .multifile import MANIFEST_SUFFIX, check_keys
from .ranking import rank_steps, steps_to_keep
from .reader import ReadOptions, load_set_in, load_source
from .snapshot import BackgroundWriter, freeze
from .storage import FileRecord, open_storage
from .steps import (
    BASE,
    LOCK,
    MARKER,
    MAX_MARKER_BYTES,
    STEP_DIR,
    changed_file,
    clean_metrics,
    lock_abandoned,
    lock_bytes,
    make_marker,
    marker_problem,
    marker_records,
    step_dir,
)
from .writer import Payload, TorchValue, plan_multi, plan_single, write_files, write_set

__all__ = ["CheckpointManager"]

logger = logging.getLogger("safeckpt")

class CheckpointManager:
    """Keeps the checkpoints of a training run in ``directory``: save, list, retain, restore.

    Args:
        directory: a local directory, a ``file://`` URL, or an fsspec URL
            (``s3://bucket/run``, ``gs://...``, ``memory://...``).
        max_to_keep: keep at most this many newest complete steps (``None``: all).
        keep_best: also keep the best this many complete steps by ``metric``.
        metric: the metric name that :meth:`best` and ``keep_best`` rank by.
        mode: ``"min"`` or ``"max"``: whether a smaller or a larger metric is better.
        format: ``"safe"``, ``"torch"`` or ``"auto"``, as for :func:`safeckpt.save_single_file`.
        multi: save each step as a multi-file set (one file per top-level key;
            keys must then be safe file-name fragments) instead of one file.
        storage_options: passed to the fsspec filesystem (credentials, ``endpoint_url``...).

    Raises:
        ValueError: for an invalid option (``keep_best`` without ``metric``, ``mode``
            not min/max, a count below 1, an unknown format).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        format: str = "safe",
        multi: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        for name, count in (("max_to_keep", max_to_keep), ("keep_best", keep_best)):
            if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {count!r}")
        if keep_best is not None and metric is None:
            raise ValueError("keep_best needs metric= (the metric to rank steps by)")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if format not in ("safe", "torch", "auto"):
            raise ValueError(f"format must be 'safe', 'torch' or 'auto', got {format!r}")
        self.max_to_keep = max_to_keep
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self.format = format
        self.multi = multi
        self._store = open_storage(directory, storage_options)
        self.directory = self._store.url
        self._markers: dict[int, dict[str, Any]] = {}  # complete markers never change: a cache, not an index
        self._unranked: set[int] = set()  # steps whose recorded metric is invalid (logged once)
        self._writer = BackgroundWriter(f"safeckpt-writer:{self.directory}")
        self._store.makedirs("")
        self._cleanup(self._complete_steps())

    def __repr__(self) -> str:
        return f"<CheckpointManager {self.directory!r}: {len(self.all_steps())} steps>"

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.wait()
        except Exception:
            if exc_type is None:
                raise

    # saving ---------------------------------------------------------------------------

    def save(self, step: int, state: Mapping[Any, Any], metrics: Mapping[str, Any] | None = None, *, blocking: bool = True) -> None:
        """Save ``state`` as ``step`` and commit it; then apply retention.

        With ``blocking=False`` the state is encoded and its tensors are copied to CPU
        memory before this returns (the caller may change its tensors right away), and
        the files are written on a background thread. At most one such write is in
        flight: the next ``save`` (or :meth:`wait`) waits for it first.

        Args:
            step: a non-negative int not saved yet.
            state: the training state (a dict); never modified.
            metrics: numbers (or 0-d tensors) or strings recorded in the marker, e.g. ``{"loss": 0.3}``;
                it must hold the manager's ``metric``, as a finite real number.
            blocking: write now (``True``) or in the background.

        Raises:
            ValueError: if ``step`` is negative or already saved, ``metrics`` exceed 1 MiB as JSON, lack
                the manager's ``metric``, or hold it as NaN or infinity, or hold an int beyond float range.
            TypeError: for a metric that is not a number or str (the ranked one: not a real number).
            UnsupportedValueError: with ``format="safe"``, naming a value the format cannot hold.
            Exception: the failure of the previous background save, if it failed (that step is not committed).
            OSError: if writing fails (blocking saves).
        """
        self._writer.join()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self._marker(step) is not None:
            raise ValueError(f"step {step} is already saved in {self.directory}")
        clean = clean_metrics(metrics, self.metric)
        files = self._plan(state)
        if not blocking:
            for _, payload in files:
                if isinstance(payload, Encoded):
                    freeze(payload)
            self._writer.submit(lambda: self._write_step(step, files, clean), tag=step)
        else:
            self._write_step(step, files, clean)

    def wait(self) -> None:
        """Wait for the background save in flight, if any.

        Raises:
            Exception: the exception the background save failed with (once; that step is not committed).
        """
        self._writer.join()

    def _plan(self, state: Mapping[Any, Any]) -> list[tuple[str, Payload]]:
        if not self.multi:
            files = plan_single(state, f"{BASE}.safeckpt", self.format)
            return [(f"{BASE}.pt" if isinstance(p, TorchValue) else name, p) for name, p in files]
        return plan_multi(state, BASE, check_keys(list(state)), self.format)

    def _write_step(self, step: int, files: list[tuple[str, Payload]], metrics: dict[str, Any]) -> None:
        rel = step_dir(step)
        self._store.remove_tree(rel)  # an incomplete earlier attempt at this step
        self._store.makedirs(rel)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._store.write_bytes(f"{rel}/{LOCK}", lock_bytes(now))
        named = [(f"{rel}/{name}", payload) for name, payload in files]
        if self.multi:
            keys = [name[len(BASE) + 1 :].rpartition(".")[0] for name, _ in files]
            records = write_set(self._store, named, keys, f"{rel}/{BASE}{MANIFEST_SUFFIX}", format=self.format, record=True)
        else:
            records = write_files(self._store, named, format=self.format)
        marker = make_marker(step, metrics, now, "multi" if self.multi else "single", records)
        self._store.write_bytes(f"{rel}/{MARKER}", marker)  # the commit point
        self._store.remove(f"{rel}/{LOCK}")
        self._retain()

    # listing ----------------------------------------------------------------------------

    def _step_dirs(self) -> dict[int, str]:
        out = {}
        for name, size in self._store.listdir().items():
            match = STEP_DIR.match(name)
            if match and size is None:
                out[int(match.group(1))] = name
        return out

    def _marker(self, step: int) -> dict[str, Any] | None:
        """The valid marker of ``step``, or ``None`` (incomplete or missing)."""
        if step in self._markers:
            return self._markers[step]
        document = self._read_json(f"{step_dir(step)}/{MARKER}")
        if marker_problem(document, step) is not None:
            return None
        self._markers[step] = document
        return document

    def _read_json(self, rel: str) -> Any:
        """The JSON document of a marker or lock, or ``None`` if it is missing, torn, oversized or malformed."""
        try:
            return json.loads(self._store.read(rel, MAX_MARKER_BYTES))
        except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return None

    def _complete_steps(self) -> list[int]:
        steps = sorted(step for step in self._step_dirs() if self._marker(step) is not None)
        for gone in set(self._markers) - set(steps):
            self._markers.pop(gone, None)
        return steps

    def _check_background(self) -> None:
        if not self._writer.busy:
            self._writer.join()  # raises a failure that is already known

    def all_steps(self) -> list[int]:
        """The complete steps, oldest first, read from the directory.

        Raises:
            Exception: a background save's failure, once it is known.
        """
        self._check_background()
        return self._complete_steps()

    def latest(self) -> int | None:
        """The newest complete step, or ``None`` when there is none (a save still in flight is not complete)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics recorded with a complete step.

        Raises:
            FileNotFoundError: if ``step`` is not a complete step.
        """
        marker = self._marker(step)
        if marker is None:
            raise FileNotFoundError(f"no complete step {step} in {self.directory}")
        return dict(marker["metrics"])

    def _ranked(self, steps: list[int]) -> list[int]:
        """Complete steps that have a valid ``metric``, best first (see :func:`rank_steps`)."""
        markers = [(step, self._marker(step)) for step in steps]
        return rank_steps(markers, self.metric, self.mode, self._unranked, self.directory)

    def best(self) -> int | None:
        """The complete step with the best ``metric`` (per ``mode``), or ``None`` if no step has it.

        Raises:
            ValueError: if the manager was created without ``metric``.
        """
        if self.metric is None:
            raise ValueError("best() needs the manager to be created with metric=")
        ranked = self._ranked(self.all_steps())
        return ranked[0] if ranked else None

    # restoring ---------------------------------------------------------------------------

    def restore(self, step: int | None = None, **load_kwargs: Any) -> Any:
        """Load a complete step (default: the newest that loads), waiting for a background save first.

        Without ``step``, a newest step that is corrupt (its files differ from its marker,
        a digest does not match with ``verify=True``, or it does not decode) is skipped,
        with a warning on the ``"safeckpt"`` logger naming it and why, and the next newer
        one is tried, down to the oldest. A ``step`` asked for is never replaced.

        Args:
            step: the step to load; ``None`` for the newest complete step that loads.
            **load_kwargs: ``device``, ``allowed_globals``, ``verify``, ``trust_pickle``,
                ``limits``, as for :func:`safeckpt.load`.

        Returns:
            The saved state.

        Raises:
            FileNotFoundError: if there is no complete step (or not ``step``).
            IntegrityError: if a file is missing or its size differs from the marker
                (without ``step``: the newest step's error, when no step loads).
            CheckpointFormatError: if the step does not decode (likewise).
            Exception: a background save's failure.
        """
        self._writer.join()
        if step is not None:
            marker = self._marker(step)
            if marker is None:
                raise FileNotFoundError(f"no complete step {step} in {self.directory}; complete steps: {self.all_steps()}")
            return self._restore_step(step, marker, load_kwargs)
        steps = self.all_steps()[::-1]
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        first_error: Exception | None = None
        for candidate in steps:
            marker = self._marker(candidate)
            if marker is None:  # deleted since it was listed
                continue
            try:
                state = self._restore_step(candidate, marker, load_kwargs)
            except (IntegrityError, CheckpointFormatError) as exc:
                first_error = first_error or exc
                logger.warning("restore: skipping step %d in %s: %s", candidate, self.directory, exc)
                continue
            if candidate != steps[0]:
                logger.warning("restore: loaded step %d, the newest step in %s that loads", candidate, self.directory)
            return state
        assert first_error is not None
        raise first_error

    def _restore_step(self, step: int, marker: dict[str, Any], load_kwargs: dict[str, Any]) -> Any:
        """Load one complete step after checking its files against its marker."""
        rel = step_dir(step)
        changed = changed_file(marker, self._store.listdir(rel))
        if changed is not None:
            where = self._store.display(f"{rel}/{changed.name}")
            raise IntegrityError(
                f"{where} is missing or not the {changed.size} bytes its {MARKER} marker records: "
                "the step was modified after it was committed",
                file=where,
            )
        options = ReadOptions(**load_kwargs)
        try:
            if marker["layout"] == "multi":
                return load_set_in(self._store.child(rel), BASE, None, options)
            with self._store.open(f"{rel}/{marker['entry']}") as source:
                return load_source(source, options)
        except FileNotFoundError as exc:
            raise CheckpointFormatError(f"step {step} in {self.directory} is unreadable: {exc}", file=str(exc.filename)) from exc

    # retention and cleanup -------------------------------------------------------------------

    def _retain(self) -> None:
        steps = self._complete_steps()
        ranked = self._ranked(steps) if self.keep_best is not None else []
        keep = steps_to_keep(steps, self.max_to_keep, self.keep_best, ranked)
        for step in steps:
            if step not in keep:
                self._delete(step)
        self._cleanup([step for step in steps if step in keep])

    def _delete(self, step: int) -> None:
        rel = step_dir(step)
        self._store.remove(f"{rel}/{MARKER}")  # first: from here on it is incomplete, never torn-but-complete
        self._markers.pop(step, None)
        self._store.remove_tree(rel)

    def _cleanup(self, complete: list[int]) -> None:
        newest = complete[-1] if complete else -1
        done = set(complete)
        for step, name in self._step_dirs().items():
            if step in done or step == self._writer.pending:
                continue
            if step < newest or lock_abandoned(self._read_json(f"{name}/{LOCK}")):
                self._store.remove_tree(name)

    def step_files(self, step: int) -> list[FileRecord]:
        """The files of a complete step, as its marker records them (names relative to its directory).

        Raises:
            FileNotFoundError: if ``step`` is not a complete step.
        """
        marker = self._marker(step)
        if marker is None:
            raise FileNotFoundError(f"no complete step {step} in {self.directory}")
        return marker_records(marker)
