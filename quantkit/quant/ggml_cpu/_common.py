"""Shared settings of the CPU kernels."""

import numpy as np

F = np.float32
OPTS = dict(error_model="numpy", boundscheck=False, nogil=True, cache=True)
