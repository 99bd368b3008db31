"""Small models shared by the engram_vision and sample tests (random weights, output head not zero)."""

from __future__ import annotations

import torch

from engram_vision.config import EngramConfig, ModelConfig, model_config
from engram_vision.model import EngramGPT

TINY_ENGRAM = EngramConfig(layers=(0, 1), heads_per_order=2, head_dim=8, rows_per_head=31, conv_dilation=2)


def tiny_config(engram: EngramConfig | None = TINY_ENGRAM, **overrides) -> ModelConfig:
    return model_config("gpt-tiny", engram=engram, **overrides)


def random_model(config: ModelConfig, seed: int = 0) -> EngramGPT:
    """EngramGPT in eval mode whose zero-initialised parts (head, conv) are random, so every path matters."""
    torch.manual_seed(seed)
    model = EngramGPT(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.output.weight, std=0.5)
        for memory in model.engram_layers():
            if memory.config.use_conv:
                torch.nn.init.normal_(memory.conv.weight, std=0.3)
    return model
