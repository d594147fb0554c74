"""The library version, in a module of its own so that no module has to import the package root."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
