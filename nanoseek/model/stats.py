"""What the layers report besides their hidden states, collected over one forward: the expert ids each MoE layer
routed its tokens to (the loads that auxiliary-loss-free balancing counts, DeepSeek-V3 §2.1.2), and in training
the sequence-wise balance losses (V3 eq. 17-20) and DSA's indexer KL losses and top-k recalls (V3.2-Exp §2.1).

`Transformer.forward` returns one in `CausalLMOutput.stats`; pass it to `mtp_forward(..., stats=)` to add the MTP
layers'. Nothing stays behind in the modules, so no autograd graph outlives the step that built it.

Legend: N tokens, K experts per token, E routed experts, L MoE layers that ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class LayerStats:
    expert_ids: list[torch.Tensor] = field(default_factory=list)  # per MoE layer in call order, [N, K]
    balance_losses: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, when seq_aux_alpha > 0
    indexer_losses: list[torch.Tensor] = field(default_factory=list)  # per DSA layer with indexer_loss_on
    indexer_recalls: list[torch.Tensor] = field(default_factory=list)

    def expert_load(self, n_experts: int) -> Optional[torch.Tensor]:
        """[L, E] float32: tokens routed to each expert, per MoE layer (a fixed shape, so it compiles)."""
        if not self.expert_ids:
            return None
        # per layer: MTP layers see fewer tokens than the main ones
        return torch.stack([torch.zeros(n_experts, device=i.device).scatter_add_(
            0, i.reshape(-1), torch.ones(i.numel(), device=i.device)) for i in self.expert_ids])

    def balance_loss(self) -> Optional[torch.Tensor]:
        return torch.stack(self.balance_losses).sum() if self.balance_losses else None

    def indexer_loss(self) -> Optional[torch.Tensor]:
        return torch.stack(self.indexer_losses).sum() if self.indexer_losses else None

    def indexer_recall(self) -> Optional[torch.Tensor]:
        return torch.stack(self.indexer_recalls).mean() if self.indexer_recalls else None
