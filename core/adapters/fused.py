"""One adapter over several Linear layers that read the same input: the fused layer an original checkpoint holds.

diffusers splits what BFL and SAI checkpoints store as one layer (a joint block's q, k, v projections →
``attn.qkv``; FLUX.1's single-block q, k, v and MLP input → ``linear1``).  LoRA trained on the parts can be
written exactly as one fused LoRA, but LoHa, LoKr, OFT, DoRA … cannot: their ΔW over the fused layer is not
the parts' ΔWs stacked.  So the adapter is trained on the fused layer itself, as the original model has it:

* :class:`FusedLinear` shows the parts as that one layer (``in_features``, ``out_features`` = the parts' sum,
  ``weight`` = their rows stacked) without touching the model: the parts stay where diffusers put them, the
  model's module tree and state dict are unchanged, and nothing is copied until an algorithm reads ``weight``.
* :meth:`FusedLinear.attach` hooks each part: the adapter's contribution for the whole fused output is computed
  once per input and every part adds its own rows of it.  The parts are called one after another with the same
  input tensor (the attention processors and blocks do so), so the shared result is kept only until every part
  has taken its rows; a part called with another tensor recomputes (correct, only slower).
"""
from __future__ import annotations

import torch
from torch import nn

from core.quantize import dequantized_weight


class FusedLinear(nn.Linear):
    """The layers ``parts`` (same input, outputs concatenated in this order) as one Linear layer.

    A subclass of ``nn.Linear`` so that every algorithm treats it as the layer it stands for; it owns no
    parameters (the parts are not its submodules) and is never called itself."""

    def __init__(self, parts: list[nn.Linear]):
        nn.Module.__init__(self)
        if not parts or any(not isinstance(p, nn.Linear) for p in parts):
            raise TypeError("FusedLinear: the parts must be Linear layers")
        if len({p.in_features for p in parts}) != 1:
            raise ValueError(f"FusedLinear: the parts read inputs of different widths "
                             f"{[p.in_features for p in parts]}")
        self.__dict__["parts"] = list(parts)
        self.in_features = parts[0].in_features
        self.out_sizes = [p.out_features for p in parts]
        self.out_features = sum(self.out_sizes)
        self._hooked: list = []   # each part's forward before attach
        self._adapter = None
        self._shared_input = None
        self._shared_delta = None
        self._left = 0

    # the fused layer's tensors, built from the parts when an algorithm asks (DoRA, OFT, (IA)³, GLoRA)
    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([dequantized_weight(p) for p in self.parts], dim=0)

    @property
    def bias(self) -> torch.Tensor | None:
        if any(p.bias is None for p in self.parts):
            return None
        return torch.cat([p.bias.detach() for p in self.parts], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("FusedLinear is a view of layers that stay in the model; call the model, not the view")

    # -- hooking the parts ---------------------------------------------------------------------------
    def attach(self, adapter) -> None:
        """Make every part add its rows of ``adapter``'s contribution to its own output."""
        if self._hooked:
            return
        self._adapter = adapter
        starts = [sum(self.out_sizes[:i]) for i in range(len(self.parts))]
        for part, start, size in zip(self.parts, starts, self.out_sizes):
            self._hooked.append(("forward" in part.__dict__, part.forward))
            part.forward = self._part_forward(part.forward, start, size)

    def detach_adapter(self) -> None:
        for part, (had_own, original) in zip(self.parts, self._hooked):
            if had_own:
                part.forward = original
            else:  # leave no instance attribute behind
                del part.forward
        self._hooked, self._adapter = [], None
        self._forget()

    def _part_forward(self, original, start: int, size: int):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = original(x, *args, **kwargs)
            delta = self._delta_for(x)
            if delta is None:
                return out
            return out + delta[..., start:start + size].to(out.dtype)
        return forward

    def _delta_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapter's contribution for ``x`` over the whole fused output, computed once per input tensor and
        let go when every part has taken its rows (None: the adapter adds nothing this time)."""
        if self._shared_input is not x:
            self._shared_input, self._left = x, len(self.parts)
            self._shared_delta = self._adapter.contribution(x)
        delta = self._shared_delta
        self._left -= 1
        if self._left <= 0:
            self._forget()
        return delta

    def _forget(self) -> None:
        self._shared_input = self._shared_delta = None
        self._left = 0
