"""Integrations with training frameworks, each in its own module, importing its framework only when imported.

- :mod:`safeckpt.integrations.lightning`: ``SafeCheckpointIO``, Lightning's ``CheckpointIO`` plugin
  (``pip install 'safeckpt[lightning]'``).

Importing :mod:`safeckpt` or this package imports no framework.
"""

from __future__ import annotations

__all__: list[str] = []
