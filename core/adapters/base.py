"""What every adapter algorithm shares: hooking the base layer, dropout, DoRA, the file-format plumbing.

An adapter module never replaces the layer it adapts: ``apply_to`` swaps the layer's ``forward`` for the
adapter's, which calls the original and adds the adapter's contribution.  The model's own module tree and
state-dict keys stay intact, so the same model can be handed to diffusers or compared with it.

Each algorithm subclass supplies

* ``file_tensors()``: suffix -> tensor as it is written into the community (LyCORIS / kohya) file;
* ``param_tensors()``: suffix -> the parameter or buffer a file tensor is loaded into (the same suffixes);
* ``weight_delta()``: ΔW at multiplier 1 (training-time rank dropout included), for the weight-rebuild path;
* optionally ``bypass_delta(x)``: the contribution computed without building ΔW (LoRA's down/up chain).

The maths of every algorithm follows LyCORIS' reconstruction (which ComfyUI, Forge and A1111 mirror), so a
file trained here gives the same weights in those loaders.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.adapters.fused import FusedLinear
from core.quantize import dense_weight_shape, dequantized_weight


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m <= n: ``m == factor`` when it divides, otherwise as close to
    ``factor`` (or to a square, for -1) as divisors allow.  Same contract as LyCORIS' ``factorization``
    (LoKr's Kronecker factors, Diag-OFT's block size)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def power2factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """BOFT's split: dimension = m * n with m even and at most ``factor`` and n a power of two; the largest
    such m.  Returns (0, 0) when no split exists."""
    if factor == -1:
        factor = dimension
    best = 0
    for m in range(2, factor + 1, 2):
        if dimension % m == 0:
            n = dimension // m
            if n & (n - 1) == 0:
                best = m
    return (best, dimension // best) if best else (0, 0)


def dora_norm(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """The DoRA norm of ``weight``: per output row (``on_output``) or per input column (LyCORIS' original
    layout, what ComfyUI, Forge and A1111 read when ``dora_scale`` is (1, in)).  Shaped to broadcast."""
    rest = [1] * (weight.dim() - 1)
    if on_output:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *rest)
    return (weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(weight.shape[1], *rest).transpose(0, 1))


class AdapterModule(nn.Module):
    """Base of every algorithm.  ``name`` is the community key stem (``lora_unet_…``, ``lora_te1_…``)."""

    algo = ""
    #: LoRA+: names of the parameters that get ``lr * ratio`` (the zero-initialised "B"/up side)
    plus_param_names: tuple[str, ...] = ()

    def __init__(self, name: str, base: nn.Module, *, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, dora: bool = False, dora_on_output: bool = False):
        super().__init__()
        self.name = name
        if isinstance(base, nn.Linear):
            self.is_conv = False
            self.op = F.linear
            self.kw: dict = {}
            self.out_dim, self.in_dim = base.out_features, base.in_features
        elif isinstance(base, nn.Conv2d):
            self.is_conv = True
            self.op = F.conv2d
            self.kw = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation,
                       "groups": base.groups}
            self.out_dim, self.in_dim = base.out_channels, base.in_channels // base.groups
            if base.padding_mode != "zeros":
                raise TypeError(f"{name}: convolutions with padding_mode={base.padding_mode!r} are not supported")
        else:
            raise TypeError(f"{name}: adapters support Linear and Conv2d layers, not {type(base).__name__}")
        # the logical shape (a bitsandbytes 4-bit base stores its weight packed)
        self.shape = dense_weight_shape(base)
        self.kernel = tuple(self.shape[2:])
        # not a submodule: the base belongs to the model, not to the adapter's state dict
        self.__dict__["base"] = base
        self._base_forward = None
        self.multiplier = 1.0
        self.dropout_p = float(dropout)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.alpha_value: float | None = None
        self.init_rules: dict[str, tuple[str, float]] = {}
        self.dora = bool(dora)
        self.dora_on_output = bool(dora_on_output)
        if self.dora:
            with torch.no_grad():
                magnitude = dora_norm(dequantized_weight(base).float(), self.dora_on_output).cpu()
            self.dora_scale = nn.Parameter(magnitude)

    # -- initialisation --------------------------------------------------------------------------------
    def init_params(self, rule: str, *names: str, std: float = 1.0) -> None:
        """Initialise the named parameters by ``rule`` and remember it for :meth:`init_problems`: "zeros",
        "ones", "kaiming" (``kaiming_uniform_`` with a=√5, as nn.Linear and LyCORIS) or "normal" (``std``)."""
        init = {"zeros": nn.init.zeros_, "ones": nn.init.ones_,
                "kaiming": lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5)),
                "normal": lambda p: nn.init.normal_(p, std=std)}[rule]
        for name in names:
            init(self.get_parameter(name))
            self.init_rules[name] = (rule, std)

    def init_problems(self) -> list[str]:
        """What is wrong with a freshly built module, one message per parameter: not finite, or not what its
        initialisation rule gives (the trace of an init function replaced elsewhere in the process, which
        leaves ``torch.empty`` memory: zeros, or values up to 1e38).  Meta tensors are not checked."""
        out = []
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            t = p.detach().float()
            where = f"adapter {self.name}: {name}"
            if not bool(torch.isfinite(t).all()):
                out.append(f"{where} holds NaN or infinite values")
                continue
            rule, std = self.init_rules.get(name, ("", 0.0))
            peak = float(t.abs().max()) if t.numel() else 0.0
            if rule in ("zeros", "ones"):
                if not bool((t == (0.0 if rule == "zeros" else 1.0)).all()):
                    out.append(f"{where} should start at {rule[:-1]} everywhere (largest |value| {peak:.3g})")
            elif rule:
                fan_in = t.shape[1] * math.prod(t.shape[2:]) if t.dim() > 1 else t.numel()
                bound = 1 / math.sqrt(fan_in) if rule == "kaiming" else 8 * std
                expected = bound / math.sqrt(3) if rule == "kaiming" else std
                spread = float(t.std()) if t.numel() > 1 else peak
                if peak > bound * 1.001 or peak == 0 or (t.numel() >= 64 and not 0.5 < spread / expected < 2):
                    out.append(f"{where} is not a {rule} initialisation (std {spread:.3g}, expected ≈{expected:.3g}; "
                               f"largest |value| {peak:.3g})")
        return out

    # -- hooking the base layer ------------------------------------------------------------------------
    def apply_to(self) -> None:
        if isinstance(self.base, FusedLinear):   # a view of several layers: each adds its rows
            self.base.attach(self)
        elif self._base_forward is None:
            self._had_own_forward = "forward" in self.base.__dict__
            self._base_forward = self.base.forward
            self.base.forward = self.forward

    def restore(self) -> None:
        if isinstance(self.base, FusedLinear):
            self.base.detach_adapter()
        elif self._base_forward is not None:
            if self._had_own_forward:
                self.base.forward = self._base_forward
            else:  # leave no instance attribute behind (a copied layer would call the original's forward)
                del self.base.forward
            self._base_forward = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._base_forward(x, *args, **kwargs)
        delta = self.contribution(x)
        return out if delta is None else out + delta.to(out.dtype)

    def contribution(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the adapter adds to the layer's output for input ``x`` (None: nothing this time)."""
        if self.multiplier == 0:
            return None
        # drawn on the host (torch's CPU generator, saved with a training state): no device synchronisation
        if self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return None
        return self.delta(x)

    # -- the contribution ------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight, dense (a quantized base is dequantized: DoRA, OFT, (IA)³ and GLoRA need
        it every step; for an unquantized layer this is ``weight.detach()``, no copy)."""
        return dequantized_weight(self.base)

    def bypass_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The contribution without building ΔW, or None where the algorithm needs the rebuilt weight."""
        return None

    def weight_delta(self) -> torch.Tensor:
        raise NotImplementedError

    def row_dropout(self, delta: torch.Tensor) -> torch.Tensor:
        """Rank dropout of the weight-rebuild algorithms (as LyCORIS): drop output rows of ΔW, rescaled."""
        if not (self.training and self.rank_dropout):
            return delta
        keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
        return delta * (keep / (1.0 - self.rank_dropout)).view(-1, *[1] * (delta.dim() - 1))

    def effective_delta(self) -> torch.Tensor:
        """W' − W as the layer sees it: ΔW, DoRA's renormalisation, the multiplier."""
        dw = self.weight_delta()
        if self.dora:
            w = self.base_weight().to(dw.dtype)
            merged = w + dw
            norm = dora_norm(merged, self.dora_on_output) + torch.finfo(merged.dtype).eps
            dw = merged * (self.dora_scale.to(merged.dtype) / norm) - w
        return dw * self.multiplier if self.multiplier != 1 else dw

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dora:
            out = self.bypass_delta(x)
            if out is not None:
                return out
        dw = self.effective_delta()
        x = x.to(dw.dtype)
        if self.dropout_p and self.training:
            x = F.dropout(x, self.dropout_p)
        return self.op(x, dw, None, **self.kw)

    # -- parameters ------------------------------------------------------------------------------------
    def plus_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n in self.plus_param_names or
                n.rsplit(".", 1)[0] in self.plus_param_names]

    @property
    def has_scalar(self) -> bool:
        return isinstance(getattr(self, "scalar", None), nn.Parameter)

    def _scalar(self) -> torch.Tensor | float:
        return self.scalar if self.has_scalar else 1.0

    # -- community file format -------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _with_common(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.dora:
            tensors["dora_scale"] = self.dora_scale
        return tensors

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{self.name}.{k}": v.detach() for k, v in self._with_common(self.file_tensors()).items()}
        if self.alpha_value is not None:
            out[f"{self.name}.alpha"] = torch.tensor(self.alpha_value)
        return out

    def training_tensors(self) -> dict[str, torch.Tensor]:
        """Like ``export_tensors`` but with the raw parameters (the scalar not folded in, and saved): what a
        resumed run needs to continue exactly."""
        out = {f"{self.name}.{k}": v.detach() for k, v in self._with_common(self.param_tensors()).items()}
        if self.alpha_value is not None:
            out[f"{self.name}.alpha"] = torch.tensor(self.alpha_value)
        if self.has_scalar:
            out[f"{self.name}.scalar"] = self.scalar.detach()
        return out

    def expected_keys(self) -> list[str]:
        keys = [f"{self.name}.{k}" for k in self._with_common(self.param_tensors())]
        return keys + ([f"{self.name}.alpha"] if self.alpha_value is not None else [])

    def optional_keys(self) -> list[str]:
        return [f"{self.name}.scalar"] if self.has_scalar else []

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for suffix, dest in self._with_common(self.param_tensors()).items():
                key = f"{self.name}.{suffix}"
                if key not in tensors:
                    continue
                src = tensors[key]
                if tuple(src.shape) != tuple(dest.shape):
                    raise ValueError(f"{key}: the file has shape {tuple(src.shape)}, this network "
                                     f"{tuple(dest.shape)} (different rank or settings?)")
                dest.copy_(src)
            if self.has_scalar:
                # a community file has the scalar folded into its weights; a training state carries it
                key = f"{self.name}.scalar"
                self.scalar.copy_(tensors[key] if key in tensors else torch.ones_like(self.scalar))


def rank_scale(alpha: float, rank: int, rs_lora: bool) -> tuple[float, float]:
    """(scale, alpha written to the file).  alpha 0 means alpha = rank.  rs-LoRA scales by alpha/√rank; the
    file then says alpha·√rank, so every loader's alpha/rank gives the same scale."""
    alpha = float(alpha) if alpha else float(rank)
    if rs_lora:
        return alpha / math.sqrt(rank), alpha * math.sqrt(rank)
    return alpha / rank, alpha
