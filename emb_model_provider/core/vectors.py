"""The array type every floor passes vectors in: encoders return it, the services stack and
normalise it, the wire models render it. It lives on the ground floor so that ``protocol.py``
need not import an encoder module to name it."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Rows of float32 vectors, shape (inputs, dimensions).
Vectors = npt.NDArray[np.float32]
