"""Padding that routing ignores: a batch's real tokens (its attention mask), given to the MoE layers before the
forward, so that each layer routes those tokens only.

A layer that holds ``RealTokens`` takes its real tokens out of the batch, runs its router, experts and shared
experts on them alone, and puts their outputs back in place (a padding token's output is 0). So the balance loss,
the z-loss, the capacity (sized by the real tokens, as DeepSpeed sizes it by its input's), the expert loads, the
bias updates and every routing metric are those of the batch without its padding. A model continued in place
(moe/fused_experts.py) routes every token by its family's router, then runs and counts the real tokens' routes only.
The positions are found on the host from the batch's mask before it moves to the device, so the layers read nothing
back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RealTokens:
    """Where a batch's real tokens are: positions in its flattened [B x S] tokens and the row of each."""

    index_N: torch.Tensor  # position of each real token among the batch's B x S tokens (int64, on the device)
    rows_N: torch.Tensor   # the batch row each real token is in (int64, on the device)
    rows: int              # B
    tokens: int            # B x S

    @classmethod
    def of(cls, attention_mask_BS: Optional[torch.Tensor], device: torch.device) -> Optional[RealTokens]:
        """The real tokens of a batch with ``attention_mask_BS`` (1 real, 0 padding; best on the host, else it is
        read back once); None when there is no mask or no padding."""
        if attention_mask_BS is None:
            return None
        mask_BS = attention_mask_BS.detach().to("cpu", torch.bool)
        if bool(mask_BS.all()):
            return None
        if not bool(mask_BS.any(dim=1).all()):
            raise ValueError("a batch row is all padding (its attention_mask is 0 everywhere): every row needs a "
                             "real token")
        rows_N, columns_N = mask_BS.nonzero(as_tuple=True)
        index_N = rows_N * mask_BS.shape[1] + columns_N
        return cls(index_N.to(device), rows_N.to(device), mask_BS.shape[0], mask_BS.numel())

    def take(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows of ``x_TD`` (the batch's B x S tokens), in order."""
        if x_TD.shape[0] != self.tokens:
            raise ValueError(f"the MoE layers were given the attention mask of {self.tokens} tokens for a forward of "
                             f"{x_TD.shape[0]}: set it for each batch (MoELayers.ignore_padding)")
        return x_TD.index_select(0, self.index_N)

    def put(self, y_ND: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """The B x S rows with the real tokens' ``y_ND`` in place and ``fill`` at the padding."""
        out = y_ND.new_full((self.tokens, *y_ND.shape[1:]), fill)
        return out.index_copy(0, self.index_N, y_ND)
