"""Test set-up for ds-optim: under the CUDA simulator, make its shared arrays safe to allocate from many threads.

Numba's simulator runs every CUDA thread of a block as a Python thread, and ``cuda.shared.array`` looks the
block's array up in a dict by call site and creates it when missing, with no lock
(``numba.cuda.simulator.kernelapi.FakeCUDAShared.array``, numba 0.68). Two threads that both find it missing each
make one, so they reduce into different "shared" arrays: the numba-cuda LAMB kernel's norm reduction then came out
wrong about one run in four of ``NUMBA_ENABLE_CUDASIM=1 pytest tests/ds_optim/test_kernel_conformance.py -k
numba_cuda`` (``test_grad_scale_divides_grads[numba_cuda-lamb]``, in CI). On a GPU shared memory is per block and
there is no such race. The lookup below is the simulator's own, under a lock.
"""

import os
import sys
import threading
import traceback

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    _allocating = threading.Lock()
    _simulator_array = kernelapi.FakeCUDAShared.array

    def _shared_array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer made with the block, nothing to race on
            return _simulator_array(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # the kernel's line, as the simulator keys it
        with _allocating:
            array = self._allocations.get(caller)
            if array is None:
                array = self._allocations[caller] = np.empty(shape, dtype)
        return array

    kernelapi.FakeCUDAShared.array = _shared_array
