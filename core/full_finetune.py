"""Full fine-tuning: the trainable is the model itself (no adapter network).

``FullFineTune`` offers the trainer the same small surface as an adapter network (parameters, parameter
groups, train/eval, restore, training state), so the training step and the loop stay family- and
method-agnostic.  Trained weights are fp32 master weights; frozen parts keep the plan's weight dtype.
``EMA`` keeps an exponential moving average of the trained parameters, on the device or on the CPU.
"""
from __future__ import annotations

import torch
from torch import nn

FULL_FINETUNE = "full_finetune"


class FullFineTune:
    """The denoiser (and the text encoders when they train) as the trained parameters."""

    #: block swapping must write a swapped block's updated weights back
    trains_denoiser = True

    def __init__(self, components, train_text_encoder: bool):
        self.parts: dict[str, nn.Module] = {"denoiser": components.denoiser}
        if train_text_encoder:
            for i, te in enumerate(components.text_encoders):
                self.parts[f"te{i}"] = te
        for module in self.parts.values():
            module.requires_grad_(True)
        #: the denoiser's BlockSwapper when blocks are swapped: their weights live in its host copies
        self.swapper = None

    # -- what the optimizer and the loop need ----------------------------------------------------------
    def named_parameters(self):
        for part, module in self.parts.items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    yield f"{part}.{name}", p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def param_groups(self, lr: float, text_encoder_lr: float) -> list[dict]:
        groups = [{"params": [p for p in self.parts["denoiser"].parameters() if p.requires_grad], "lr": lr}]
        te = [p for part, m in self.parts.items() if part != "denoiser" for p in m.parameters() if p.requires_grad]
        if te:
            groups.append({"params": te, "lr": text_encoder_lr or lr})
        return groups

    def train(self, mode: bool = True):
        for module in self.parts.values():
            module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def restore(self) -> None:
        """Nothing is patched into the model (the adapter networks' ``restore`` undoes their hooks)."""

    def live(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters' current values (a swapped block's are in host memory)."""
        return self.swapper.live(params) if self.swapper is not None else params

    # -- resume state ----------------------------------------------------------------------------------
    def training_state_dict(self) -> dict[str, torch.Tensor]:
        names, params = zip(*self.named_parameters())
        # a swapped weight's host copy is a view of its block's buffer: a file needs its own tensor
        return {name: t.detach().clone() if t is not p else t.detach().contiguous()
                for name, p, t in zip(names, params, self.live(list(params)))}

    @torch.no_grad()
    def load_training_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing, unexpected = params.keys() - sd.keys(), sd.keys() - params.keys()
        if missing or unexpected:
            raise ValueError(f"saved model weights do not fit this model: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected (e.g. {sorted(missing | unexpected)[:3]})")
        swapped = set(map(id, self.swapper.trained_parameters())) if self.swapper is not None else set()
        for name, p in params.items():
            if id(p) in swapped:
                self.swapper.load_value(p, sd[name])
            else:
                p.copy_(sd[name])

    # -- saving ----------------------------------------------------------------------------------------
    def module_state_dicts(self, ema: "EMA | None" = None) -> dict[str, dict[str, torch.Tensor]]:
        """Each trained part's full state dict (buffers included), the EMA's values in place of the live
        parameters when ``ema`` is given."""
        out = {}
        averaged = ema.named_tensors() if ema is not None else {}
        for part, module in self.parts.items():
            swapped = self.swapper is not None and part == "denoiser"
            sd = self.swapper.host_state_dict(module) if swapped else dict(module.state_dict())
            for name in list(sd):
                key = f"{part}.{name}"
                if key in averaged:
                    sd[name] = averaged[key]
            out[part] = sd
        return out


class EMA:
    """Exponential moving average ``ema ← decay·ema + (1−decay)·param`` after every optimizer step.

    On the device the update is one ``_foreach_lerp_`` (no host synchronisation).  On the CPU the
    parameters are first copied into pinned buffers; the CPU then has to wait for those copies."""

    def __init__(self, named_params, decay: float, on_cpu: bool, live=None):
        self.decay = decay
        items = list(named_params)
        self.names = [n for n, _ in items]
        self.params = [p for _, p in items]
        self.on_cpu = on_cpu and self.params[0].device.type != "cpu"
        #: the parameters → their current values (a swapped block's live in host memory)
        self.live = live or (lambda params: params)
        with torch.no_grad():
            if self.on_cpu:
                pin = self.params[0].device.type == "cuda"
                self.shadow = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for p in self.params]
                for s, p in zip(self.shadow, self.live(self.params)):
                    s.copy_(p.detach())
                self.staging = [torch.empty_like(s, pin_memory=pin) for s in self.shadow]
            else:
                self.shadow = [p.detach().float().clone() for p in self.live(self.params)]
                self.staging = None

    @torch.no_grad()
    def update(self) -> None:
        params = [p.detach() for p in self.live(self.params)]
        if self.staging is not None:
            torch._foreach_copy_(self.staging, params, non_blocking=True)
            if self.params[0].device.type == "cuda":
                torch.cuda.current_stream(self.params[0].device).synchronize()
            params = self.staging
        elif params[0].dtype != torch.float32:
            params = [p.float() for p in params]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.contiguous() for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if set(sd) != set(self.names):
            raise ValueError("the saved EMA weights do not fit this model")
        for name, s in zip(self.names, self.shadow):
            s.copy_(sd[name])
