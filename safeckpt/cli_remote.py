"""URL arguments of the command line (``s3://``, ``gs://``, ``memory://``, ``file://``) and ``--storage-option``.

Every path argument may be a URL (SPEC section 5). Two roads, one per direction:

- What a command writes (``convert``'s outputs, ``split``'s set, ``merge``'s
  file) goes through the library's storage layer, which takes URLs itself and
  keeps its atomicity per backend (the manifest of a set last).
- What a command only reads (``inspect``, ``verify``, ``scan``, ``diff``, the
  source of ``split`` and ``merge``) is fetched into a private temporary
  directory by :meth:`Remote.local` -- the file, and what it brings with it: the
  component files of a set, the files of a manager directory or step, the
  shards of a Hugging Face index -- and read there by the same code as a local
  file. Every line, JSON document and error the command prints passes through
  :meth:`Remote.shown`, which names the URL, never the temporary copy.

``--storage-option KEY=VALUE`` (repeatable) gives the fsspec filesystem its
options: ``VALUE`` is read as JSON when it parses (``true``, ``3``,
``{"endpoint_url": "..."}``) and as a string otherwise; a dotted ``KEY`` nests
(``client_kwargs.endpoint_url=http://localhost:9000``).

This module imports neither torch nor fsspec at import time (``--help`` and
``scan`` start fast); fsspec is imported the first time a URL is seen.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from .storage.fsspec_store import url_to_fs
from .storage.paths import is_url

__all__ = ["Remote", "parse_storage_options"]

MARKER_NAMES = ("COMMITTED",)  # a manager step's marker: the whole step directory comes with it
MAX_LISTED_JSON = 64 << 20  # a manifest or index read to learn which files come with it


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> the ``storage_options`` mapping (see the module docstring).

    Raises:
        ValueError: for an item without ``=`` or with an empty key.
    """
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--storage-option {item!r}: expected KEY=VALUE (a dotted KEY nests: a.b=1)")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *parents, last = key.split(".")
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--storage-option {item!r}: {part!r} is already set to a value, not options")
            node = child
        node[last] = value
    return options


def _is_remote(arg: Any) -> bool:
    return is_url(arg) and not str(arg).startswith("file://")


class Remote:
    """The URLs one command was given: local copies of what it reads, and how to name them back.

    Args:
        storage_options: the fsspec options of every URL of the command.
    """

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(storage_options or {})
        self._tmp: str | None = None
        self._names: list[tuple[str, str]] = []  # (local prefix, URL prefix), longest local first

    # ------------------------------------------------------------------ what a path argument is

    def fs(self, url: str) -> tuple[Any, str]:
        """The fsspec filesystem of ``url`` and the path inside it.

        Raises:
            ValueError: naming ``url``, for a protocol fsspec does not know or whose package is not installed.
        """
        try:
            return url_to_fs(url, self.options)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"{url}: cannot open this URL: {exc}") from exc

    def is_dir(self, arg: str) -> bool:
        """True when ``arg`` (a path or URL) is a directory (on an object store: a prefix with objects under it)."""
        if not is_url(arg):
            return os.path.isdir(arg)
        fs, path = self.fs(arg)
        return bool(fs.isdir(path))

    def is_file(self, arg: str) -> bool:
        """True when ``arg`` (a path or URL) is a file."""
        if not is_url(arg):
            return os.path.isfile(arg)
        fs, path = self.fs(arg)
        return bool(fs.isfile(path))

    def exists(self, arg: str) -> bool:
        """True when something is at ``arg`` (a path or URL)."""
        if not is_url(arg):
            return os.path.exists(arg)
        fs, path = self.fs(arg)
        return bool(fs.exists(path))

    def size(self, arg: str) -> int:
        """The size of the file at ``arg`` (a path or URL)."""
        if not is_url(arg):
            return os.stat(arg).st_size
        fs, path = self.fs(arg)
        return int(fs.size(path) or 0)

    def files_in(self, arg: str, recursive: bool) -> list[str]:
        """The files under the directory URL ``arg`` (sorted URLs; hidden names left out)."""
        fs, path = self.fs(arg)
        root = path.rstrip("/")
        if recursive:
            found = list(fs.find(root))
        else:
            found = [i["name"] for i in fs.ls(root, detail=True) if i.get("type") == "file"]
        base = arg.rstrip("/")
        out = []
        for p in sorted(found):
            rel = p[len(root):].lstrip("/") if p.startswith(root) else posixpath.basename(p)
            if rel and not any(part.startswith(".") for part in rel.split("/")):
                out.append(f"{base}/{rel}")
        return out

    # ------------------------------------------------------------------ reading: local copies

    def local(self, arg: str, *, recursive: bool = True) -> str:
        """A local path holding what the command reads at ``arg``; ``arg`` itself when it is local.

        A directory is copied (with ``recursive``, its subdirectories too); a file
        with what comes with it (see the module docstring); a base path that is no
        file with its set's manifest and component files.

        Raises:
            FileNotFoundError: naming ``arg``, when there is nothing there.
        """
        if not is_url(arg):
            return arg
        if not _is_remote(arg):
            return arg.removeprefix("file://")
        fs, path = self.fs(arg)
        path = path.rstrip("/")
        url = arg.rstrip("/")
        name = posixpath.basename(path) or "root"
        root = tempfile.mkdtemp(prefix="remote-", dir=self._temp_root())
        local = os.path.join(root, name)
        self._names.append((local, url))
        self._names.sort(key=lambda pair: len(pair[0]), reverse=True)
        if fs.isdir(path):
            self._get_tree(fs, path, local, recursive)
        elif fs.isfile(path):
            self._get_file(fs, path, local)
            self._get_companions(fs, path, url, local, root)
        else:
            parent = posixpath.dirname(path)
            prefix = posixpath.splitext(name)[0]
            companions = self._siblings(fs, parent, lambda n: n.startswith(prefix + "_") or n == prefix + ".safeckpt.json")
            if not companions:
                raise FileNotFoundError(2, "no such file, and no multi-file set there", url)
            self._get_siblings(fs, parent, companions, root, url)
        return local

    def _temp_root(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="safeckpt-cli-")
        return self._tmp

    @staticmethod
    def _get_file(fs: Any, path: str, local: str) -> None:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with fs.open(path, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)

    def _get_tree(self, fs: Any, path: str, local: str, recursive: bool) -> None:
        os.makedirs(local, exist_ok=True)
        for info in fs.ls(path, detail=True):
            child = info["name"].rstrip("/")
            name = posixpath.basename(child)
            if not name or name in (".", ".."):
                continue
            if info.get("type") == "directory":
                if recursive:
                    self._get_tree(fs, child, os.path.join(local, name), recursive)
            else:
                self._get_file(fs, child, os.path.join(local, name))

    @staticmethod
    def _siblings(fs: Any, parent: str, wanted: Any) -> list[str]:
        try:
            entries = fs.ls(parent, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            posixpath.basename(i["name"].rstrip("/"))
            for i in entries
            if i.get("type") == "file" and wanted(posixpath.basename(i["name"].rstrip("/")))
        )

    def _get_siblings(self, fs: Any, parent: str, names: list[str], root: str, url: str) -> None:
        url_parent = url.rpartition("/")[0]
        for name in names:
            self._get_file(fs, posixpath.join(parent, name), os.path.join(root, name))
        self._names.append((root, url_parent))
        self._names.sort(key=lambda pair: len(pair[0]), reverse=True)

    def _get_companions(self, fs: Any, path: str, url: str, local: str, root: str) -> None:
        """The files a manifest, a Hugging Face index or a step marker brings with it."""
        name = posixpath.basename(path)
        parent = posixpath.dirname(path)
        if name in MARKER_NAMES:  # a step's marker: the whole step directory
            self._get_tree(fs, parent, root, True)
            self._names.append((root, url.rpartition("/")[0]))
            self._names.sort(key=lambda pair: len(pair[0]), reverse=True)
            return
        named = _json_names(local)
        if named:
            available = set(self._siblings(fs, parent, lambda n: n in named))
            self._get_siblings(fs, parent, sorted(available - {name}), root, url)

    # ------------------------------------------------------------------ writing: local work, then upload

    def is_remote(self, arg: Any) -> bool:
        """True for a URL that is not a local ``file://`` one."""
        return _is_remote(arg)

    def workspace(self, url: str) -> str:
        """An empty local directory standing for the directory ``url`` (named back as ``url``)."""
        local = tempfile.mkdtemp(prefix="remote-", dir=self._temp_root())
        self._names.append((local, url.rstrip("/")))
        self._names.sort(key=lambda pair: len(pair[0]), reverse=True)
        return local

    def upload(self, local_root: str, url: str, files: list[str] | None = None) -> list[str]:
        """Upload ``files`` (default: every file under ``local_root``) to the same places under ``url``.

        JSON files (a shard index, a manifest) go last, so that what names the others
        appears only once they are all there. Returns the URLs written.
        """
        if files is None:
            files = [os.path.join(d, f) for d, _, names in os.walk(local_root) for f in names]
        fs, root = self.fs(url)
        written = []
        for local in sorted(files, key=lambda f: (f.endswith(".json"), f)):
            rel = os.path.relpath(local, local_root).replace(os.sep, "/")
            fs.put_file(local, posixpath.join(root.rstrip("/"), rel))
            written.append(f"{url.rstrip('/')}/{rel}")
        return written

    # ------------------------------------------------------------------ naming back

    def shown(self, value: Any) -> Any:
        """``value`` (text, or a JSON document) with every local copy named by its URL."""
        if not self._names:
            return value
        if isinstance(value, str):
            for local, url in self._names:
                if local in value:
                    value = value.replace(local, url)
            return value
        if isinstance(value, dict):
            return {self.shown(k): self.shown(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.shown(v) for v in value)
        return value

    def close(self) -> None:
        """Remove the local copies."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _json_names(local: str) -> set[str]:
    """The plain file names a JSON manifest or Hugging Face index names (empty for any other file)."""
    try:
        with open(local, "rb") as f:
            if f.read(1) != b"{":
                return set()
            if os.fstat(f.fileno()).st_size > MAX_LISTED_JSON:
                return set()
            f.seek(0)
            document = json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return set()
    if type(document) is not dict:
        return set()
    names: list[Any] = []
    components = document.get("components")
    if type(components) is list:
        names.extend(c.get("file") for c in components if type(c) is dict)
    weight_map = document.get("weight_map")
    if type(weight_map) is dict:
        names.extend(weight_map.values())
    return {n for n in names if type(n) is str and n and "/" not in n and "\\" not in n and n not in (".", "..")}
