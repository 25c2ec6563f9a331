"""nanoseek: own a DeepSeek-class language model (MLA, DeepSeekMoE, MTP, DSA) in plain PyTorch.

    import nanoseek
    model = nanoseek.from_pretrained("path/to/hf_folder", dtype=torch.bfloat16)
    logits = model(input_ids).logits
"""
from nanoseek.config import PRESETS, ModelConfig, get_preset
from nanoseek.model import CausalLMOutput, DenseCache, Transformer
from nanoseek.checkpoint import CheckpointError, from_pretrained, save_pretrained

__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "CausalLMOutput", "DenseCache",
           "from_pretrained", "save_pretrained", "CheckpointError"]
__version__ = "0.1.0"
