"""The three quantized dtypes torch's eager fbgemm pipeline uses, by torch's names.

=========  ==========  ==========================  ======================================
name       storage     range                       used for
=========  ==========  ==========================  ======================================
quint8     uint8       [0, 255]                    activations (QuantStub, Linear output)
qint8      int8        [-128, 127]                 weights
qint32     int32       [-2**31, 2**31 - 1]         bias-like values (rare in eager mode)
=========  ==========  ==========================  ======================================
"""

from __future__ import annotations

import numpy as np

QDTYPES: dict[str, type[np.integer]] = {"quint8": np.uint8, "qint8": np.int8, "qint32": np.int32}
"""Quantized dtype name -> the NumPy dtype that stores its integer codes (torch's ``int_repr()``)."""


def check_qdtype(dtype: object, argname: str = "dtype") -> str:
    """Return ``dtype`` if it names a quantized dtype, else raise a ValueError that lists the valid names."""
    if not isinstance(dtype, str) or dtype not in QDTYPES:
        raise ValueError(f"{argname} must be one of {sorted(QDTYPES)} (torch.quint8 etc. as strings), got {dtype!r}")
    return dtype


def qdtype_range(dtype: str) -> tuple[int, int]:
    """(quant_min, quant_max) of the full range of a quantized dtype, e.g. (0, 255) for "quint8"."""
    info = np.iinfo(QDTYPES[check_qdtype(dtype)])
    return int(info.min), int(info.max)


def qdtype_of_codes(q: np.ndarray, argname: str = "q") -> str:
    """The quantized dtype whose codes ``q`` holds: uint8 -> "quint8", int8 -> "qint8", int32 -> "qint32"."""
    for name, np_dtype in QDTYPES.items():
        if q.dtype == np_dtype:
            return name
    raise TypeError(f"{argname} must hold quantized integer codes (uint8, int8 or int32), got dtype {q.dtype}")
