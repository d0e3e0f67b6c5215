"""moesaic: unified multimodal pretraining with per-token sparse capacity."""

from moesaic.errors import MoesaicError

__version__ = "0.1.0"
__all__ = ["MoesaicError", "__version__"]
