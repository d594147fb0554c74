"""``python -m safeckpt``: the ``safeckpt`` command line (see :mod:`safeckpt.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
