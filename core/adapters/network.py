"""The adapter network: one adapter module per target layer, keyed by its community name, built for the
chosen algorithm; parameter groups (LoRA+), export and loading of the community file."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from architectures.base import AdapterTarget
from core.settings import DORA_ALGORITHMS, RANKED_ALGORITHMS
from core.adapters.full import FullModule
from core.adapters.glora import GLoRAModule
from core.adapters.ia3 import IA3Module
from core.adapters.loha import LoHaModule
from core.adapters.lokr import LoKrModule
from core.adapters.lora import LoConModule, LoRAModule
from core.adapters.oft import BOFTModule, DiagOFTModule

#: the module of each algorithm the settings name (``settings.ADAPTER_ALGORITHMS``)
ALGORITHMS: dict[str, type[nn.Module]] = {cls.algo: cls for cls in (
    LoRAModule, LoConModule, LoHaModule, LoKrModule, IA3Module, DiagOFTModule, BOFTModule, GLoRAModule, FullModule)}
#: algorithms whose strength is rank/alpha (the others: OFT's rank is a block size, (IA)³ and full have none)
RANKED = RANKED_ALGORITHMS
TUCKER_ALGORITHMS = ("locon", "loha", "lokr")
LORAPLUS_ALGORITHMS = ("lora", "locon")

# Relative tolerance for a file's alpha against the network's: a file saved in fp16/bf16 rounds alpha
# (rs-LoRA alphas such as 16·√8 are not representable).
_ALPHA_RTOL = 4e-3


@dataclass
class AdapterOptions:
    """Algorithm options beyond rank/alpha/dropout.  0 for conv_rank / conv_alpha means "as rank / alpha"."""
    conv_rank: int = 0
    conv_alpha: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_tucker: bool = False
    use_scalar: bool = False
    rs_lora: bool = False
    dora: bool = False
    dora_on_output: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    rescale: bool = False
    loraplus_lr_ratio: float = 0.0
    block_ranks: dict = field(default_factory=dict)  # block name -> (rank, alpha or None); rank 0 drops it

    @classmethod
    def from_settings(cls, n) -> "AdapterOptions":
        """From ``settings.network``; options that do not apply to the chosen algorithm are left at their
        defaults, so a hidden setting never changes a run."""
        algo = n.algorithm
        ranked = algo in RANKED
        conv = algo in RANKED and n.target == "full"  # the conv options show for the 'full' preset only
        return cls(
            conv_rank=n.conv_rank if conv else 0, conv_alpha=n.conv_alpha if conv else 0.0,
            rank_dropout=n.rank_dropout if ranked else 0.0, module_dropout=n.module_dropout,
            use_tucker=n.use_tucker and conv and algo in TUCKER_ALGORITHMS,
            use_scalar=n.use_scalar and algo in RANKED and algo != "lora",
            rs_lora=n.rs_lora and ranked,
            dora=n.dora and algo in DORA_ALGORITHMS,
            dora_on_output=n.dora and n.dora_on_output and algo in DORA_ALGORITHMS,
            factor=n.lokr_factor if algo == "lokr" else -1,
            decompose_both=n.decompose_both and algo == "lokr", full_matrix=n.full_matrix and algo == "lokr",
            rescale=n.oft_rescale and algo in ("diag-oft", "boft"),
            loraplus_lr_ratio=n.loraplus_lr_ratio if algo in LORAPLUS_ALGORITHMS else 0.0,
            block_ranks=parse_block_ranks(n.block_ranks) if ranked else {})


def _is_kxk_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


class AdapterNetwork(nn.Module):
    """All adapter modules of one run, keyed by their community name."""

    def __init__(self, modules: dict[str, nn.Module], parts: dict[str, str], algorithm: str,
                 rank: int, alpha: float, options: AdapterOptions | None = None):
        super().__init__()
        self.adapters = nn.ModuleDict(modules)
        self.parts = parts  # name -> "unet" / "te1" / …
        self.algorithm = algorithm
        self.rank = rank
        self.alpha = alpha
        self.options = options or AdapterOptions()

    def apply_to(self) -> None:
        for m in self.adapters.values():
            m.apply_to()

    def restore(self) -> None:
        for m in self.adapters.values():
            m.restore()

    def set_multiplier(self, value: float) -> None:
        for m in self.adapters.values():
            m.multiplier = value

    def param_groups(self, lr: float, text_encoder_lr: float) -> list[dict]:
        """One group per part (UNet, text encoders); with a LoRA+ ratio the up/B matrices get their own group
        at ``lr * ratio``."""
        ratio = self.options.loraplus_lr_ratio
        groups: dict[str, list] = {}
        for name, m in self.adapters.items():
            part = "unet" if self.parts[name] == "unet" else "te"
            plus = {id(p) for p in m.plus_params()} if ratio > 0 else set()
            for p in m.parameters():
                if p.requires_grad:
                    groups.setdefault(part + ("+" if id(p) in plus else ""), []).append(p)
        out = []
        for part, name, base_lr in (("unet", "unet", lr), ("te", "text_encoder", text_encoder_lr or lr)):
            if groups.get(part):
                out.append({"params": groups[part], "lr": base_lr, "name": name})
            if groups.get(part + "+"):
                out.append({"params": groups[part + "+"], "lr": base_lr * ratio, "name": name + "_plus"})
        return out

    # -- files -----------------------------------------------------------------------------------------
    @staticmethod
    def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in sd.items():
            v = v.detach().to("cpu")
            out[k] = v.to(dtype).contiguous() if dtype is not None and v.is_floating_point() else v.contiguous()
        return out

    def export_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The community file: kohya key names, LyCORIS tensor suffixes."""
        return self._cast({k: v for m in self.adapters.values() for k, v in m.export_tensors().items()}, dtype)

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """The exact trainable state in fp32 (the community file plus what a file folds away, e.g. LyCORIS'
        scalar), for resuming a run; ``load_export_state_dict`` reads both."""
        return self._cast({k: v for m in self.adapters.values() for k, v in m.training_tensors().items()},
                          torch.float32)

    def load_export_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        expected = {k for m in self.adapters.values() for k in m.expected_keys()}
        optional = {k for m in self.adapters.values() for k in m.optional_keys()}
        if strict:
            missing = sorted(k for k in expected if k not in sd and not k.endswith(".alpha"))
            unexpected = sorted(k for k in sd if k not in expected and k not in optional)
            if missing or unexpected:
                raise ValueError(f"adapter file does not match this model: {len(missing)} missing keys "
                                 f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        for name, m in self.adapters.items():
            alpha_key = f"{name}.alpha"
            if alpha_key in sd and m.alpha_value is not None:
                file_alpha = float(sd[alpha_key])
                if abs(file_alpha - m.alpha_value) > _ALPHA_RTOL * max(1.0, abs(m.alpha_value)):
                    raise ValueError(f"{alpha_key}: file has alpha {file_alpha}, network {m.alpha_value}")
                if file_alpha != m.alpha_value and file_alpha != 0 and hasattr(m, "rank"):
                    # adopt the file's (rounded) alpha: the output then matches every other loader's
                    m.scale *= file_alpha / m.alpha_value
                    m.alpha_value = file_alpha
            m.load_tensors(sd)


def parse_block_ranks(text: str) -> dict[str, tuple[int, float | None]]:
    """'down_0=4, mid=32/16' -> {"down_0": (4, None), "mid": (32, 16.0)}; a message names a bad entry."""
    out: dict[str, tuple[int, float | None]] = {}
    for entry in (e.strip() for e in text.replace("\n", ",").split(",")):
        if not entry:
            continue
        name, sep, value = (p.strip() for p in entry.partition("="))
        rank_text, _, alpha_text = value.partition("/")
        try:
            if not (sep and name):
                raise ValueError
            rank = int(rank_text)
            alpha = float(alpha_text) if alpha_text.strip() else None
            if rank < 0 or (alpha is not None and alpha < 0):
                raise ValueError
        except ValueError:
            raise ValueError(f"network.block_ranks: cannot read {entry!r}; write block=rank or block=rank/alpha, "
                             f"e.g. 'down_0=4, mid=32/16'") from None
        out[name] = (rank, alpha)
    return out


def apply_block_ranks(targets: list[AdapterTarget], block_ranks: dict) -> list[tuple[AdapterTarget, int | None,
                                                                                    float | None]]:
    """(target, rank override, alpha override) for each target kept; a rank of 0 leaves its block out."""
    known = {t.block for t in targets if t.block}
    unknown = sorted(set(block_ranks) - known)
    if unknown:
        raise ValueError(f"network.block_ranks: no adapted layer is in block(s) {', '.join(unknown)}; the blocks "
                         f"of this model and target are: {', '.join(sorted(known))}")
    out = []
    for t in targets:
        rank, alpha = block_ranks.get(t.block, (None, None))
        if rank != 0:
            out.append((t, rank, alpha))
    return out


def build_network(targets: list[AdapterTarget], algorithm: str, rank: int, alpha: float,
                  dropout: float = 0.0, options: AdapterOptions | None = None) -> AdapterNetwork:
    """One adapter module per target.  k×k convolutions use ``options.conv_rank``/``conv_alpha`` (0: the
    linear rank/alpha), like kohya's conv_dim/conv_alpha."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown adapter algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    o = options or AdapterOptions()
    cls = ALGORITHMS[algorithm]
    common = dict(rank_dropout=o.rank_dropout, module_dropout=o.module_dropout, use_tucker=o.use_tucker,
                  use_scalar=o.use_scalar, rs_lora=o.rs_lora, dora=o.dora, dora_on_output=o.dora_on_output)
    extra = {"lokr": dict(factor=o.factor, decompose_both=o.decompose_both, full_matrix=o.full_matrix),
             "diag-oft": dict(rescale=o.rescale), "boft": dict(rescale=o.rescale)}.get(algorithm, {})
    if algorithm in ("ia3", "diag-oft", "boft", "full"):
        common = dict(module_dropout=o.module_dropout)
    if algorithm == "glora":
        common = {k: v for k, v in common.items() if k not in ("use_tucker", "dora", "dora_on_output")}
    modules, parts = {}, {}
    for t, block_rank, block_alpha in apply_block_ranks(targets, o.block_ranks):
        if t.name in modules:
            raise ValueError(f"two layers map to the same key {t.name}")
        r, a = rank, alpha
        if _is_kxk_conv(t.module) and algorithm in RANKED:
            r = o.conv_rank or rank
            a = o.conv_alpha or alpha
        if block_rank is not None:
            # a block's own rank; without its own alpha the scale alpha/rank stays the network's
            r, a = block_rank, block_alpha if block_alpha is not None else a * block_rank / r
        modules[t.name] = cls(t.name, t.module, r, a, dropout, **common, **extra)
        parts[t.name] = t.part
    if not modules:
        raise ValueError("no layer matched the adapter's target list")
    problems = [p for m in modules.values() for p in m.init_problems()]
    if problems:
        raise RuntimeError(f"The {algorithm} adapter was built wrong ({len(problems)} problem(s)); training it would "
                           "save garbage. " + "; ".join(problems[:5]))
    return AdapterNetwork(modules, parts, algorithm, rank, alpha, o)


# -- metadata --------------------------------------------------------------------------------------------
def network_module(algorithm: str, options: AdapterOptions) -> str:
    """``ss_network_module``: sd-scripts' ``networks.lora`` for plain LoRA, ``lycoris.kohya`` otherwise."""
    return "networks.lora" if algorithm == "lora" and not options.dora else "lycoris.kohya"


_LYCORIS_PRESET = {"attn": "attn-only", "attn_mlp": "attn-mlp", "full": "full", "full-lin": "full-lin"}


def network_args(n) -> dict[str, str]:
    """``ss_network_args`` as sd-scripts writes it (the ``--network_args`` key=value pairs, values as strings)
    for the options that apply to ``settings.network``'s algorithm."""
    o = AdapterOptions.from_settings(n)
    algo = n.algorithm
    args: dict[str, str] = {"algo": algo, "target": n.target}
    if network_module(algo, o) == "lycoris.kohya":
        args["preset"] = _LYCORIS_PRESET.get(n.target, n.target)
    if n.target == "full" and algo in RANKED:
        args["conv_dim"] = str(o.conv_rank or n.rank)
        args["conv_alpha"] = str(o.conv_alpha or n.alpha)
    defaults = AdapterOptions()
    names = {"rank_dropout": "rank_dropout", "module_dropout": "module_dropout", "use_tucker": "use_tucker",
             "use_scalar": "use_scalar", "rs_lora": "rs_lora", "dora": "dora_wd",
             "dora_on_output": "wd_on_output", "factor": "factor", "decompose_both": "decompose_both",
             "full_matrix": "full_matrix", "rescale": "rescaled", "loraplus_lr_ratio": "loraplus_lr_ratio"}
    for f in fields(AdapterOptions):
        if f.name in names and getattr(o, f.name) != getattr(defaults, f.name):
            args[names[f.name]] = str(getattr(o, f.name))
    if n.dropout and algo in RANKED:
        args["dropout"] = str(n.dropout)
    for key in ("include", "exclude", "block_ranks"):
        value = getattr(n, key, "")
        if value.strip():
            args[key] = value.strip()
    return args


def network_args_json(n) -> str:
    return json.dumps(network_args(n))


__all__ = ["ALGORITHMS", "RANKED", "AdapterOptions", "AdapterNetwork", "build_network", "network_module",
           "network_args", "network_args_json"]
