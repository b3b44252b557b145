"""convmixer-kernels: fused CUDA, Triton and C++ kernels for ConvMixer and depthwise-conv networks.

    import convmixer_kernels as ck
    y = ck.functional.dw_block(x, w, b, gamma, beta, rm, rv, nbt, training=True)
    ck.set_backend("triton");  with ck.backend("torch"): ...;  ck.info()
"""

from . import _ext, ops  # noqa: F401  (registers the ops)
from . import functional, reference, torch_ops  # noqa: F401
from .backends import BACKENDS, available, backend, get_backend, set_backend
from .info import info
from .fuse import FuseReport, fuse, unfuse
from .models import ConvMixer
from .modules import FusedDepthwiseBlock, FusedPatchEmbed, FusedPointwiseBlock

__version__ = "0.1.0"

__all__ = ["BACKENDS", "ConvMixer", "FuseReport", "FusedDepthwiseBlock", "FusedPatchEmbed", "FusedPointwiseBlock",
           "fuse", "unfuse", "available", "backend", "functional", "get_backend", "info",
           "reference", "set_backend", "__version__"]
