"""RMSNorm (Zhang & Sennrich 2019) as DeepSeek uses it: statistics in float32, weight applied in the input dtype."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF/DeepSeek rounding: normalise in fp32, cast back to x's dtype, then scale. F.rms_norm does the first
        # two in one op (it upcasts half inputs and rounds the normalised value once; bit-identical to
        # x.float() * rsqrt(mean(x^2) + eps) cast back), which matters at decode where ops, not flops, cost.
        return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps)
