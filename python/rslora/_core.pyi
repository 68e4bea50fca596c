# Type stubs for rslora._core (the compiled module). One section per area.
import numpy as np
from numpy.typing import NDArray

# --- backward (issue 4) --------------------------------------------------------------------------
def lora_linear_backward(dy: NDArray, x: NDArray, W: NDArray, A: NDArray, B: NDArray, scale: float,
                         xa: NDArray | None, dx: NDArray | None, dA: NDArray | None,
                         dB: NDArray | None) -> None: ...

# --- multi-adapter (issue 4) ---------------------------------------------------------------------
def lora_add_multi(y: NDArray, x: NDArray, A_all: NDArray, B_all: NDArray,
                   adapter_ids: NDArray[np.int64], scales: NDArray[np.float64]) -> None: ...
def lora_linear_multi(x: NDArray, W: NDArray, A_all: NDArray, B_all: NDArray,
                      adapter_ids: NDArray[np.int64], scales: NDArray[np.float64],
                      bias: NDArray | None, out: NDArray) -> None: ...
