"""lavin-fast: a performance-engineered LaVin-DiT (ST-VAE + J-DiT) with fused Triton and CUDA kernels.

Importing the package touches no GPU and compiles nothing; kernels compile at first use.
"""

from lavin_fast import _moved

__version__ = "0.1.0"
__all__ = ["__version__"]

_moved.install()  # old import paths of moved modules, for one release (see _moved.py)
