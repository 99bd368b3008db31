"""engram_vision: the class-conditional AR prior (LlamaGen-compatible) with Engram-2D memory. Plain torch.

Public names: `ModelConfig`, `EngramConfig`, `MODEL_SIZES`, `model_config`, `EngramGPT`, `DecodeState`.
"""

from engram_vision.cache import DecodeState
from engram_vision.config import MODEL_SIZES, EngramConfig, ModelConfig, model_config
from engram_vision.model import EngramGPT

__all__ = ["MODEL_SIZES", "DecodeState", "EngramConfig", "EngramGPT", "ModelConfig", "model_config"]
