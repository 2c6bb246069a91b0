"""NumPy's overrides of named operations (backends/overrides.py): none yet."""
from __future__ import annotations
