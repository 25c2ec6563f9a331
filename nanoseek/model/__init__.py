"""The DeepSeek V2 / V3 / V3.2 network, one concept per module (see each file's docstring)."""
from nanoseek.model.cache import DenseCache, LatentCache
from nanoseek.model.transformer import CausalLMOutput, Transformer

__all__ = ["Transformer", "CausalLMOutput", "LatentCache", "DenseCache"]
