"""Whether a leaf is a quantized weight (a qwix QArray), without importing qwix.

qwix, and flax.nnx under it, take about a second to import, which every command would pay at
start-up though most never quantize. No QArray can exist before qwix is imported, so where qwix
is not loaded nothing is quantized; the modules that quantize import qwix when they first do.
"""

from __future__ import annotations

import sys
from typing import Any


def is_qarray(x: Any) -> bool:
    """x is a qwix QArray (False, without importing qwix, where qwix is not loaded)."""
    qwix = sys.modules.get("qwix")
    return qwix is not None and isinstance(x, qwix.QArray)


def as_array(x: Any) -> Any:
    """x, a QArray dequantized (in its scales' dtype); anything else as it is: for consumers
    that take no QArray, such as the chunked vocab loss."""
    return sys.modules["qwix"].dequantize(x) if is_qarray(x) else x
