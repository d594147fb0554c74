"""Review, class 1: dangerous callables under names the first blocklist did not know.

Each name below was checked to run or touch the system when ``pickle.loads`` resolves
it (file created by ``logging.FileHandler``, ``numpy._core.memmap.memmap(..., "w+")``,
``numpy.savetxt``, ``mailbox.Maildir``, ``readline.write_history_file``,
``torch.UntypedStorage.from_file(path, True, n)``; a module imported by
``_frozen_importlib._gcd_import``), or is one of: a C accelerator spelling of a blocked
module (``_operator``, ``_functools``), a package re-export under the defining module
(``numpy.lib._npyio_impl.load``, ``torch.utils.model_zoo.load_url``), a shared-library
loader (``torch.classes.load_library``), a process crasher (``faulthandler._sigsegv``).
Before the fix every one was classed "unknown": ``scan`` said "suspicious" and
``allowed_globals`` let it run.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

import safeckpt
from safeckpt.errors import UnsafeCheckpointError
from safeckpt.policy import classify
from safeckpt.refs import AllowList

NEW_SPELLINGS = [
    "_operator:attrgetter",  # C accelerator of operator
    "_operator:methodcaller",
    "_functools:partial",
    "_functools:reduce",
    "operator:call",
    "_frozen_importlib:_gcd_import",  # importlib's bootstrap: imports a module by name
    "_frozen_importlib_external:SourceFileLoader",
    "_imp:create_dynamic",  # loads an extension module
    "logging:FileHandler",  # creates its file
    "logging.handlers:RotatingFileHandler",
    "logging.handlers:SocketHandler",
    "wave:open",
    "mailbox:Maildir",  # creates a directory
    "readline:write_history_file",
    "faulthandler:_sigsegv",  # crashes the process
    "faulthandler:_read_null",
    "faulthandler:dump_traceback_later",
    "_posixshmem:shm_open",
    "tty:setraw",
    "uuid:_get_command_stdout",  # runs a program
    "_sitebuiltins:_Helper",  # help(): pydoc's pager
    "unittest.mock:_importer",
    "unittest:main",
    "zipapp:create_archive",
    "antigravity:geohash",  # importing antigravity opens a browser
    "_xxsubinterpreters:run_string",
    "numpy:savetxt",
    "numpy:savez",
    "numpy:loadtxt",
    "numpy:genfromtxt",
    "numpy:fromregex",
    "numpy:DataSource",
    "numpy:test",  # runs numpy's test suite
    "numpy._core.memmap:memmap",  # where numpy.memmap is defined
    "numpy.core.memmap:memmap",
    "numpy.lib._npyio_impl:load",  # where numpy.load is defined (allow_pickle is positional)
    "numpy.lib._npyio_impl:save",
    "numpy.lib._format_impl:read_array",
    "numpy.rec:fromfile",
    "numpy._core.records:fromfile",
    "numpy.lib._datasource:open",
    "torch.utils.model_zoo:load_url",  # torch.hub's downloader, re-exported
    "torch.testing._internal.common_utils:shell",
    "torch:UntypedStorage.from_file",  # torch.from_file as a class method; shared=True maps the file
    "torch.storage:UntypedStorage.from_file",
    "torch:FloatStorage.from_file",
    "torch.storage:TypedStorage.from_file",
    "torch:classes.load_library",  # dlopen of a path
    "torch._classes:classes.load_library",
    "torch.distributed.distributed_c10d:_tensor_to_object",  # unpickles a tensor's bytes
    "torch.utils.data.dataloader:DataLoader",
    "torch.utils.benchmark.utils.cpp_jit:compile_timeit_template",
    "torch.cuda.memory:_dump_snapshot",
    "torch.cuda:memory._save_segment_usage",
    "torch.onnx:export",
    "torch.utils.show_pickle:main",
    "torch.utils.tensorboard:SummaryWriter",
    "torch.library:Library",
]

# names real checkpoints hold: they must stay loadable ("unknown" or "allowed")
STILL_FINE = {
    "torch.nn.modules.linear:Linear": "unknown",
    "torch.optim.adam:Adam": "unknown",
    "torch.distributed.tensor.placement_types:Shard": "unknown",
    "torch.testing:assert_close": "unknown",
    "uuid:UUID": "unknown",
    "logging:Logger": "unknown",
    "numpy:float32": "unknown",
    "numpy:dtype": "allowed",
    "numpy._core.multiarray:_reconstruct": "allowed",
    "_codecs:encode": "allowed",
    "collections:OrderedDict": "allowed",
    "_collections:OrderedDict": "unknown",
    "torch._utils:_rebuild_tensor_v2": "allowed",
    "torch:FloatStorage": "allowed",
    "torch.optim.lr_scheduler:StepLR.load_state_dict": "unknown",
}


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _call(module: str, qualname: str, arg: str) -> bytes:
    return b"\x80\x04" + _text(module) + _text(qualname) + b"\x93" + _text(arg) + b"\x85R."


@pytest.mark.parametrize("name", NEW_SPELLINGS)
def test_gadget_is_dangerous(name: str) -> None:
    assert classify(*name.split(":", 1)) == "dangerous"
    assert name in AllowList([name]).refused


@pytest.mark.parametrize(("name", "expected"), sorted(STILL_FINE.items()))
def test_ordinary_names_keep_their_class(name: str, expected: str) -> None:
    assert classify(*name.split(":", 1)) == expected


@pytest.mark.parametrize("name", NEW_SPELLINGS)
def test_scan_and_allowed_load_refuse_gadget(name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sentinel = tmp_path / "PWNED"
    path = tmp_path / "payload.pkl"
    path.write_bytes(_call(*name.split(":", 1), str(sentinel)))
    assert safeckpt.scan(path).verdict == "dangerous"
    with caplog.at_level(logging.WARNING, logger="safeckpt"):
        with pytest.raises(UnsafeCheckpointError) as info:
            safeckpt.load(path, allowed_globals=[name])
    assert name in info.value.globals
    assert "ignored" in caplog.text
    assert not sentinel.exists()
