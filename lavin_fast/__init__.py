"""lavin-fast: a performance-engineered LaVin-DiT (ST-VAE + J-DiT) with fused Triton and CUDA kernels.

Importing the package touches no GPU and compiles nothing; kernels compile at first use.
"""

__version__ = "0.1.0"
