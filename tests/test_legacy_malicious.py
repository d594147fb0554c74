"""Malicious legacy checkpoints are refused by load, load_single_file, convert and scan, and never run.

The corpus is ``tests/malicious.py``: every file there would create its sentinel
file if unpickled (``test_corpus_is_live`` proves it in a child process), so a
sentinel that exists after a test means the reader executed the payload. An audit
hook also records process-spawning, dynamic-loading, socket and browser events
while safeckpt runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safeckpt
from malicious import CORPUS, EXPECTED_GLOBALS, LIVE_CHECKED, REFERENCE_ONLY, registered_extensions

NAMES = [name for name, _ in CORPUS]
TESTS_DIR = Path(__file__).resolve().parent

#: Globals every plain torch checkpoint names; a refusal must not blame them.
BENIGN = frozenset({
    "collections:OrderedDict",
    "torch._utils:_rebuild_tensor_v2",
    "torch:FloatStorage",
    "torch:LongStorage",
})
USES = frozenset({"called", "instantiated", "referenced", "build"})
STATUSES = frozenset({"allowed", "unknown", "dangerous"})

# --------------------------------------------------------------------------- side-effect watch

_WATCHED = (
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "ctypes.dlopen", "ctypes.dlsym", "socket.__new__", "socket.bind", "socket.connect",
    "webbrowser.open", "shutil.rmtree",
)
_recording: list[list[tuple[str, str]]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _recording and event.startswith(_WATCHED):
        _recording[-1].append((event, repr(args)[:200]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def watched() -> Iterator[list[tuple[str, str]]]:
    """Record watched audit events (and resolve the corpus's EXT codes) while the block runs."""
    events: list[tuple[str, str]] = []
    _recording.append(events)
    try:
        with registered_extensions():
            yield events
    finally:
        _recording.remove(events)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every corpus file, each in its own directory: ``{name: (file, sentinel)}``."""
    root = tmp_path_factory.mktemp("corpus")
    built = {}
    for name, build in CORPUS:
        directory = root / name
        directory.mkdir()
        sentinel = directory / "SENTINEL"
        path = build(directory, sentinel)
        assert path.is_file() and path.parent == directory, name
        assert not sentinel.exists(), f"building {name} ran its payload"
        built[name] = (path, sentinel)
    return built


def _requirements(name: str) -> list[tuple[str, ...]]:
    return [(req,) if isinstance(req, str) else req for req in EXPECTED_GLOBALS.get(name, ())]


def _listing(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*")}


def _check_refusal(name: str, exc: safeckpt.UnsafeCheckpointError) -> None:
    names = exc.globals
    assert isinstance(names, tuple) and list(names) == sorted(names), names
    assert all(isinstance(n, str) and ":" in n for n in names), names
    if name in EXPECTED_GLOBALS:
        assert names, f"{name}: refused without naming the offending global"
    for alternatives in _requirements(name):
        assert set(alternatives) & set(names), f"{name}: none of {alternatives} in {names}"
    assert not BENIGN & set(names), f"{name}: benign globals blamed: {names}"


# --------------------------------------------------------------------------- tests


def test_corpus_is_large_and_every_entry_has_expectations() -> None:
    assert len(CORPUS) >= 30
    assert len(set(NAMES)) == len(NAMES)
    assert set(EXPECTED_GLOBALS) | {n for n in NAMES if n.startswith("ext")} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_scan_says_dangerous(corpus: dict[str, tuple[Path, Path]], name: str) -> None:
    path, sentinel = corpus[name]
    with watched() as events:
        report = safeckpt.scan(path)
    assert report.verdict == "dangerous"
    assert any(f.severity == "dangerous" for f in report.findings), report.findings
    for finding in report.findings:
        assert finding.severity in ("suspicious", "dangerous") and isinstance(finding.kind, str) and finding.message
    for g in report.globals:
        assert ":" in g.name and g.status in STATUSES and g.uses <= USES, g
    by_name = {g.name: g for g in report.globals}
    for alternatives in _requirements(name):
        found = [by_name[a] for a in alternatives if a in by_name]
        assert found, f"{name}: scan does not list any of {alternatives}: {sorted(by_name)}"
        assert any(g.status == "dangerous" for g in found), found
    assert events == []
    assert not sentinel.exists()


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses(corpus: dict[str, tuple[Path, Path]], name: str) -> None:
    path, sentinel = corpus[name]
    for load in (safeckpt.load, safeckpt.load_single_file):
        with watched() as events, pytest.raises(safeckpt.UnsafeCheckpointError) as info:
            load(path)
        _check_refusal(name, info.value)
        assert isinstance(info.value, safeckpt.SafeCkptError)
        assert events == []
        assert not sentinel.exists()


@pytest.mark.parametrize("name", sorted(EXPECTED_GLOBALS))
def test_allowing_the_dangerous_names_does_not_override_the_blocklist(
    corpus: dict[str, tuple[Path, Path]], name: str
) -> None:
    path, sentinel = corpus[name]
    allowed = sorted({a for alternatives in _requirements(name) for a in alternatives})
    with watched() as events, pytest.raises(safeckpt.UnsafeCheckpointError) as info:
        safeckpt.load(path, allowed_globals=allowed)
    _check_refusal(name, info.value)
    assert events == []
    assert not sentinel.exists()


@pytest.mark.parametrize("name", NAMES)
def test_convert_refuses_and_writes_nothing(corpus: dict[str, tuple[Path, Path]], tmp_path: Path, name: str) -> None:
    path, sentinel = corpus[name]
    before = _listing(path.parent)
    out = tmp_path / "out"
    out.mkdir()
    with watched() as events:
        with pytest.raises(safeckpt.UnsafeCheckpointError) as single:
            safeckpt.convert(path, out / "out.safetensors")
        with pytest.raises(safeckpt.UnsafeCheckpointError) as multi:
            safeckpt.convert(path, out / "set" / "m.pth", multi=True)
    _check_refusal(name, single.value)
    _check_refusal(name, multi.value)
    assert list(out.rglob("*")) == []
    assert _listing(path.parent) == before
    assert events == []
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("name", "global_name", "expected_uses"),
    [
        ("os_system_opcodes", "os:system", {"called"}),
        ("memo_index_overwritten", "os:system", {"called"}),
        ("nt_system_referenced_only", "nt:system", {"referenced"}),
        ("shutil_rmtree_referenced_only", "shutil:rmtree", {"referenced"}),
        ("newobj_subprocess_popen_then_init", "subprocess:Popen", {"instantiated"}),
    ],
)
def test_scan_says_how_a_global_is_used(
    corpus: dict[str, tuple[Path, Path]], name: str, global_name: str, expected_uses: set[str]
) -> None:
    report = safeckpt.scan(corpus[name][0])
    (entry,) = [g for g in report.globals if g.name == global_name]
    assert entry.status == "dangerous"
    if expected_uses == {"referenced"}:
        assert entry.uses == frozenset(expected_uses)  # named, never called or instantiated
    else:
        assert expected_uses <= entry.uses


# --------------------------------------------------------------------------- the corpus is live

_FIRE = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import malicious
    with malicious.registered_extensions():
        for name, path in json.loads(open(sys.argv[2]).read()):
            try:
                torch.load(path, weights_only=False)  # what a victim does: runs the payload
            except BaseException as exc:
                print(name, type(exc).__name__, exc, file=sys.stderr)
    while True:  # let children spawned by Popen payloads finish
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    """
)

# Payloads that replace module attributes in the child process go last, after everything that loads tensors.
_HIJACKERS = ("build_sets_module_attribute", "build_hijacks_allowlisted_rebuild_tensor", "setattr_module_hijack")


@pytest.fixture(scope="module")
def fired(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bool]:
    """Build a fresh corpus, unpickle every live entry in one child process, report which sentinels appeared."""
    root = tmp_path_factory.mktemp("live")
    order = [n for n in LIVE_CHECKED if n not in _HIJACKERS] + [n for n in _HIJACKERS if n in LIVE_CHECKED]
    builders = dict(CORPUS)
    entries, sentinels = [], {}
    for name in order:
        directory = root / name
        directory.mkdir()
        sentinels[name] = directory / "SENTINEL"
        entries.append((name, str(builders[name](directory, sentinels[name]))))
        assert not sentinels[name].exists()
    listing = root / "entries.json"
    listing.write_text(json.dumps(entries))
    work = root / "cwd"
    work.mkdir()
    env = dict(os.environ, BROWSER="touch", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _FIRE, str(TESTS_DIR), str(listing)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: sentinel.exists() for name, sentinel in sentinels.items()}


def test_live_entries_cover_the_required_kinds() -> None:
    for required in ("os_system_opcodes", "exec_reduce", "subprocess_popen_reduce", "subprocess_call_reduce",
                     "os_system_reduce_torch_save", "legacy_main_pickle_malicious"):
        assert required in LIVE_CHECKED
    assert set(LIVE_CHECKED) | REFERENCE_ONLY == set(NAMES)


@pytest.mark.parametrize("name", LIVE_CHECKED)
def test_corpus_is_live(fired: dict[str, bool], name: str) -> None:
    """Real unpickling (torch.load(weights_only=False) in a child) creates the sentinel: the payload is real."""
    assert fired[name], f"{name}: the payload did not fire under torch.load(weights_only=False)"
