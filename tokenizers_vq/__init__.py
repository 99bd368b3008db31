"""VQ image tokenizers: LlamaGen-compatible VQ-GAN (encode images to codes, decode codes to images).

Plain torch; training lives in `train/lit_vq.py`. See `tokenizers_vq.model.VQModel` for the interface.
"""

from tokenizers_vq.config import VQ_SIZES, VQConfig, vq_config
from tokenizers_vq.model import VQModel

__all__ = ["VQ_SIZES", "VQConfig", "VQModel", "vq_config"]
