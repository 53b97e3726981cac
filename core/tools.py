"""Adapter tools usable from scripts and the UI: inspect, merge into a base model, resize, extract.

Everything here is family-agnostic: the family plug-in (``architectures.get(arch_id)``) loads the model and
names its layers (``adapter_targets`` / ``adapter_candidates``); the adapter modules of ``core.adapters``
compute each layer's weight delta with the same maths the community loaders use.  Counterparts of kohya
sd-scripts' ``networks/merge_lora.py``, ``resize_lora.py`` and ``extract_lora_from_models.py``.

Outputs are written atomically and never over an existing file: when ``out_path`` exists, the next free
``name-1.ext``, ``name-2.ext`` … is used and returned (``core.io.unused_path``).
"""
from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.export import write_adapter_files
from core.io import atomic_save_safetensors, unused_path

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}



# -- reading adapter files ---------------------------------------------------------------------------------
def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"adapter file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors adapter files are supported")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except Exception as e:  # corrupt / not safetensors
        raise ValueError(f"{path.name}: cannot read as safetensors ({e})") from e


def _group(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{stem: {suffix: tensor}}``; the stem is everything before the first '.' (kohya names have none)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        stem, _, suffix = k.partition(".")
        out.setdefault(stem, {})[suffix] = v
    return out


def _module_algorithm(t: dict[str, torch.Tensor]) -> str:
    if "lora_down.weight" in t or "lora_up.weight" in t:
        down = t.get("lora_down.weight")
        conv = "lora_mid.weight" in t or (down is not None and down.dim() == 4 and tuple(down.shape[2:]) != (1, 1))
        return "locon" if conv else "lora"
    if any(k.startswith("hada_") for k in t):
        return "loha"
    if any(k.startswith("lokr_") for k in t):
        return "lokr"
    if "a1.weight" in t and "b1.weight" in t:
        return "glora"
    if "oft_blocks" in t:
        return "boft" if t["oft_blocks"].dim() == 4 else "diag-oft"
    if "diff" in t:
        return "full"
    if "weight" in t and "on_input" in t:
        return "ia3"
    if "lora_A.weight" in t or "lora_B.weight" in t:
        return "peft-lora"
    return "unknown"


def _module_rank(t: dict[str, torch.Tensor]) -> int | None:
    for key, dim in (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0),
                     ("a1.weight", 1), ("lora_A.weight", 0)):
        if key in t:
            return int(t[key].shape[dim])
    return None


def _prefix(stem: str) -> str:
    m = re.match(r"^(lora_(?:unet|te\d*)|lycoris|[^_]+)", stem)
    return m.group(1) if m else stem


def adapter_summary(path: str | Path) -> dict[str, Any]:
    """What an adapter file holds: metadata (``ss_*`` / ``modelspec.*``), the algorithm inferred from the
    tensor suffixes, module count per prefix, ranks, alphas, dtypes, file size."""
    path = Path(path).expanduser()
    sd, metadata = _read(path)
    groups = _group(sd)
    algos: Counter = Counter()
    prefixes: Counter = Counter()
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    dora = 0
    for stem, t in groups.items():
        algos[_module_algorithm(t)] += 1
        prefixes[_prefix(stem)] += 1
        r = _module_rank(t)
        if r is not None:
            ranks[r] += 1
        if "alpha" in t:
            alphas[round(float(t["alpha"]), 4)] += 1
        dora += "dora_scale" in t
    algo_names = sorted(algos)
    if set(algo_names) == {"lora", "locon"}:
        algorithm = "locon"
    elif len(algo_names) == 1:
        algorithm = algo_names[0]
    else:
        algorithm = "mixed: " + ", ".join(algo_names)
    if dora:
        algorithm += " + dora"
    declared = ""
    try:
        declared = str(json.loads(metadata.get("ss_network_args") or "{}").get("algo", ""))
    except (ValueError, AttributeError):
        pass
    return {
        "path": str(path), "file_size": path.stat().st_size, "algorithm": algorithm,
        "declared_algorithm": declared or metadata.get("ss_network_module", ""), "modules": len(groups),
        "modules_per_prefix": dict(sorted(prefixes.items())), "algorithms": dict(algos),
        "ranks": dict(sorted(ranks.items())), "alphas": dict(sorted(alphas.items())),
        "dtypes": dict(Counter(str(v.dtype).replace("torch.", "") for v in sd.values())),
        "tensors": len(sd), "parameters": int(sum(v.numel() for v in sd.values())),
        "metadata": {k: v for k, v in sorted(metadata.items()) if k.startswith(("ss_", "modelspec.", "sshs_"))},
        "other_metadata": sorted(k for k in metadata if not k.startswith(("ss_", "modelspec.", "sshs_"))),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A readable multi-line text of :func:`adapter_summary`'s result."""
    lines = [f"file: {summary['path']} ({summary['file_size'] / 1e6:.2f} MB)",
             f"algorithm: {summary['algorithm']}"
             + (f" (metadata says {summary['declared_algorithm']})" if summary.get("declared_algorithm") else ""),
             f"modules: {summary['modules']}  "
             f"({', '.join(f'{k}: {v}' for k, v in summary['modules_per_prefix'].items())})",
             f"ranks: {summary['ranks'] or '-'}", f"alphas: {summary['alphas'] or '-'}",
             f"dtypes: {summary['dtypes']}", f"tensors: {summary['tensors']}, parameters: {summary['parameters']:,}"]
    meta = summary["metadata"]
    if meta:
        lines.append("metadata:")
        for k, v in meta.items():
            v = v if len(v) <= 200 else v[:200] + "…"
            lines.append(f"  {k}: {v}")
    else:
        lines.append("metadata: none")
    return "\n".join(lines)


# -- layers of a model ---------------------------------------------------------------------------------------
def _layer_map(arch, components) -> dict[str, nn.Module]:
    """Community key stem → layer, for every layer the family can put an adapter on."""
    out: dict[str, nn.Module] = {}
    with_te = bool(components.text_encoders)   # a transformer-only checkpoint has none
    try:
        candidates = arch.adapter_candidates(components, with_te)
    except Exception:
        candidates = None
    for t in candidates or []:
        out.setdefault(t.name, t.module)
    for preset in arch.adapter_presets:
        try:
            targets = arch.adapter_targets(components, preset, with_te)
        except Exception:
            continue
        for t in targets:
            out.setdefault(t.name, t.module)
    return out


def _option_grid(algo: str, t: dict[str, torch.Tensor]) -> list[tuple[int, dict]]:
    """Candidate (rank, constructor options) for building the module that reads ``t``."""
    dora_opts = [dict(dora=True, dora_on_output=o) for o in (False, True)] if "dora_scale" in t else [{}]
    if algo in ("lora", "locon"):
        rank = int(t["lora_down.weight"].shape[0])
        return [(rank, dict(use_tucker="lora_mid.weight" in t, **d)) for d in dora_opts]
    if algo == "loha":
        rank = int(t["hada_w1_b"].shape[0])
        return [(rank, dict(use_tucker="hada_t1" in t, **d)) for d in dora_opts]
    if algo == "lokr":
        rank = _module_rank(t) or 1
        dims = sorted({int(s) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b") if k in t for s in t[k].shape})
        out = []
        for factor, full, d in itertools.product([-1] + dims, (False, True), dora_opts):
            out.append((rank, dict(factor=factor, decompose_both="lokr_w1_a" in t, full_matrix=full,
                                   use_tucker="lokr_t2" in t, **d)))
        return out
    if algo == "glora":
        return [(int(t["a1.weight"].shape[1]), {})]
    if algo in ("diag-oft", "boft"):
        b = t["oft_blocks"].shape
        ranks = sorted({int(s) for s in b} | {int(b[-1]) * 2})
        return [(r, dict(rescale="rescale" in t)) for r in ranks]
    return [(1, {})]  # ia3, full


def _build_module(stem: str, layer: nn.Module, t: dict[str, torch.Tensor]) -> nn.Module:
    """The adapter module that reads this file's tensors for ``layer`` (algorithm and options inferred from
    the tensors' names and shapes)."""
    from core.adapters.network import ALGORITHMS
    algo = _module_algorithm(t)
    if algo not in ALGORITHMS:
        raise ValueError(f"{stem}: unsupported adapter format ({algo}; keys {sorted(t)})")
    if algo == "lora" and isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
        algo = "locon"
    alpha = float(t["alpha"]) if "alpha" in t else 0.0
    have = {k: tuple(v.shape) for k, v in t.items() if k not in ("alpha", "scalar")}
    last = None
    for rank, opts in _option_grid(algo, t):
        try:
            m = ALGORITHMS[algo](stem, layer, rank, alpha, 0.0, **opts)
        except (ValueError, TypeError) as e:
            last = e
            continue
        want = {k: tuple(v.shape) for k, v in m._with_common(m.param_tensors()).items()}
        if algo == "ia3":
            want.pop("on_input", None)
            have.pop("on_input", None)
        if want == have:
            m.load_tensors({f"{stem}.{k}": v for k, v in t.items()})
            m.eval()
            return m
    raise ValueError(f"{stem}: the file's {algo} tensors {have} do not fit the layer "
                     f"{type(layer).__name__}{tuple(layer.weight.shape)}" + (f" ({last})" if last else ""))


def _load_components(arch, path, config_dir):
    return arch.load_checkpoint_parts(Path(path).expanduser(), Path(config_dir).expanduser() if config_dir else None,
                                      torch.float32)


def _add_to_layer(layer: nn.Module, dw: torch.Tensor, db: torch.Tensor | None) -> None:
    """Fold ΔW (and Δb) into the layer's weights; a fused view spreads its rows over the layers it stands for."""
    from core.adapters.fused import FusedLinear
    dw = dw.reshape(-1, *layer.weight.shape[1:]) if isinstance(layer, FusedLinear) else dw.reshape(layer.weight.shape)
    row = 0
    for part in layer.parts if isinstance(layer, FusedLinear) else [layer]:
        rows = part.weight.shape[0]
        part.weight.add_(dw[row:row + rows].to(part.weight.dtype))
        if db is not None and part.bias is not None:
            part.bias.add_(db[row:row + rows].to(part.bias.dtype))
        row += rows


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"save_dtype must be one of {', '.join(_DTYPES)}, not {name!r}")
    return _DTYPES[name]


# -- merge -------------------------------------------------------------------------------------------------
def merge_adapters(arch_id: str, base_model_path: str | Path, adapters: list[tuple[str | Path, float]],
                   out_path: str | Path, config_dir: str | Path | None = None, save_dtype: str = "fp16") -> Path:
    """Folds ``weight × ΔW`` of every adapter into the base model and writes a single-file checkpoint in the
    family's original layout.  Every adapter's ΔW is computed against the unmodified base (DoRA, (IA)³ and
    OFT depend on it), then all are added.  Returns the path written."""
    import architectures
    arch = architectures.get(arch_id)
    if not arch.supports_full_checkpoint:
        able = [cls.label for cls in architectures.registry().values() if cls.supports_full_checkpoint]
        raise ValueError(f"merging into a {arch.label} checkpoint is not supported yet: writing its original "
                         f"single-file layout is implemented for {', '.join(able)} only")
    dtype = _dtype(save_dtype)
    if not adapters:
        raise ValueError("no adapter to merge")
    components = _load_components(arch, base_model_path, config_dir)
    files = [(arch.import_adapter(components, _read(p)[0]), float(w), Path(p).name) for p, w in adapters]
    layers = _layer_map(arch, components)
    weight_deltas: dict[str, torch.Tensor] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for sd, weight, name in files:
            groups = _group(sd)
            unknown = sorted(s for s in groups if s not in layers)
            if unknown and not components.text_encoders and all(s.startswith("lora_te") for s in unknown):
                raise ValueError(f"{name}: {len(unknown)} modules adapt the text encoders (e.g. {unknown[0]}), but a "
                                 f"{arch.label} checkpoint holds the transformer only (its text encoders are "
                                 "separate files), so they cannot be merged into it. Merge an adapter trained "
                                 "without text-encoder training.")
            if unknown:
                raise ValueError(f"{name}: {len(unknown)} of {len(groups)} modules match no layer of this "
                                 f"{arch.label} model (e.g. {unknown[:3]}): wrong model family?")
            for stem, t in groups.items():
                m = _build_module(stem, layers[stem], {k: v.float() for k, v in t.items()})
                dw = m.effective_delta().float() * weight
                weight_deltas[stem] = weight_deltas.get(stem, 0) + dw
                diff_b = getattr(m, "diff_b", None)
                if isinstance(diff_b, torch.Tensor):
                    bias_deltas[stem] = bias_deltas.get(stem, 0) + diff_b.float() * weight
                del m
        for stem, dw in weight_deltas.items():
            _add_to_layer(layers[stem], dw, bias_deltas.get(stem))
    spec = (arch.modelspec_architecture or "").removesuffix("/lora")
    metadata = {"format": "pt", "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": spec,
                "modelspec.title": Path(out_path).stem, "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "merged_from": json.dumps({"base": Path(base_model_path).name,
                                           "adapters": [[Path(p).name, float(w)] for p, w in adapters]})}
    return arch.save_full_checkpoint(components, unused_path(Path(out_path).expanduser()), dtype, metadata=metadata)


# -- resize ------------------------------------------------------------------------------------------------
RESIZE_MODES = ("fixed", "sv_ratio", "sv_fro")


def _new_rank(s: torch.Tensor, mode: str, value: float, max_rank: int) -> int:
    if mode == "fixed":
        k = int(value)
    elif mode == "sv_ratio":
        k = int((s >= s[0] / value).sum()) if s[0] > 0 else 1
    else:  # sv_fro
        energy = s.double() ** 2
        total = float(energy.sum())
        if total <= 0:
            k = 1
        else:
            frac = torch.cumsum(energy, 0) / total
            k = int((frac < value - 1e-12).sum()) + 1
    return max(1, min(k, max_rank))


def resize_lora(path: str | Path, out_path: str | Path, mode: str, value: float
                ) -> tuple[Path, dict[str, Any]]:
    """Re-factors every module of a LoRA / LoCon file to a new rank by SVD of ``up @ down``.

    ``mode``: ``"fixed"`` (rank ``value``), ``"sv_ratio"`` (keep singular values ≥ largest / ``value``) or
    ``"sv_fro"`` (the smallest rank keeping the fraction ``value`` of the Frobenius energy).  The rank never
    grows.  Alpha becomes ``old_scale × new_rank`` so every loader's alpha/rank keeps the scale.  Returns
    (path written, report) with per-module rank and retained energy (‖ΔW_new‖²/‖ΔW‖²) and their mean."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")
    value = float(value)
    if mode == "fixed" and (value < 1 or value != int(value)):
        raise ValueError("fixed rank must be a whole number ≥ 1")
    if mode == "sv_ratio" and value < 1:
        raise ValueError("sv_ratio must be ≥ 1 (largest / smallest kept singular value)")
    if mode == "sv_fro" and not 0 < value <= 1:
        raise ValueError("sv_fro must be a fraction in (0, 1]")
    sd, metadata = _read(path)
    groups = _group(sd)
    for stem, t in groups.items():
        algo = _module_algorithm(t)
        if algo not in ("lora", "locon"):
            raise ValueError(f"resize handles plain LoRA / LoCon files only; {stem} is {algo}")
        if "lora_mid.weight" in t:
            raise ValueError(f"resize does not handle Tucker-decomposed LoCon ({stem} has lora_mid)")
        if "dora_scale" in t:
            raise ValueError(f"resize does not handle DoRA ({stem} has dora_scale)")
        if not {"lora_down.weight", "lora_up.weight"} <= set(t):
            raise ValueError(f"{stem}: lora_down / lora_up missing")
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for stem, t in groups.items():
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            save_dtype = up.dtype
            rank = int(down.shape[0])
            alpha = float(t["alpha"]) if "alpha" in t and float(t["alpha"]) != 0 else float(rank)
            scale = alpha / rank
            w = up.float().reshape(up.shape[0], rank) @ down.float().reshape(rank, -1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            k = _new_rank(s, mode, value, min(rank, s.numel()))
            total = float((s.double() ** 2).sum())
            kept = float((s[:k].double() ** 2).sum())
            retained = kept / total if total > 0 else 1.0
            root = s[:k].sqrt()
            new_up = (u[:, :k] * root).reshape(up.shape[0], k, *up.shape[2:])
            new_down = (root[:, None] * vh[:k]).reshape(k, *down.shape[1:])
            new_alpha = scale * k
            out[f"{stem}.lora_up.weight"] = new_up.to(save_dtype).contiguous()
            out[f"{stem}.lora_down.weight"] = new_down.to(down.dtype).contiguous()
            alpha_dtype = t["alpha"].dtype if "alpha" in t else save_dtype
            out[f"{stem}.alpha"] = torch.tensor(new_alpha, dtype=alpha_dtype)
            modules[stem] = {"rank": rank, "new_rank": k, "alpha": alpha, "new_alpha": new_alpha,
                             "retained": retained}
    new_ranks = [m["new_rank"] for m in modules.values()]
    energies = [m["retained"] for m in modules.values()]
    report = {"modules": modules, "mean_retained": sum(energies) / len(energies) if energies else 1.0,
              "min_retained": min(energies) if energies else 1.0,
              "ranks": dict(sorted(Counter(new_ranks).items())), "mode": mode, "value": value}
    meta = dict(metadata)
    uniform = len(set(new_ranks)) == 1
    if uniform:
        meta["ss_network_dim"] = str(new_ranks[0])
        alphas = {round(m["new_alpha"], 6) for m in modules.values()}
        if len(alphas) == 1:
            meta["ss_network_alpha"] = str(next(iter(alphas)))
    else:
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    note = (f"resized ({mode} {value:g}): ranks {min(new_ranks)}–{max(new_ranks)} vary per module, "
            f"mean retained energy {report['mean_retained']:.4f}" if not uniform else
            f"resized ({mode} {value:g}) to rank {new_ranks[0]}, mean retained energy {report['mean_retained']:.4f}")
    meta["ss_training_comment"] = (meta.get("ss_training_comment", "") + "; " + note).lstrip("; ")
    for stale in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        meta.pop(stale, None)
    written = atomic_save_safetensors(unused_path(Path(out_path).expanduser()), out, meta)
    report["path"] = str(written)
    return written, report


def format_resize_report(report: dict[str, Any], top: int = 10) -> str:
    lines = [f"written: {report['path']}", f"mode {report['mode']} {report['value']:g}: new ranks {report['ranks']}",
             f"retained energy: mean {report['mean_retained']:.4f}, min {report['min_retained']:.4f}"]
    worst = sorted(report["modules"].items(), key=lambda kv: kv[1]["retained"])[:top]
    if worst:
        lines.append("lowest retained:")
        lines += [f"  {k}: rank {v['rank']}→{v['new_rank']}, {v['retained']:.4f}" for k, v in worst]
    return "\n".join(lines)


# -- extract -----------------------------------------------------------------------------------------------
def extract_lora(arch_id: str, base_path: str | Path, tuned_path: str | Path, out_path: str | Path, rank: int,
                 config_dir: str | Path | None = None, conv_rank: int | None = None, target: str | None = None,
                 min_diff: float = 1e-7, save_dtype: str = "fp16") -> Path:
    """A kohya LoRA approximating ``tuned − base`` on the family's adapter layers: truncated SVD of each
    layer's weight difference at ``rank`` (k×k convolutions at ``conv_rank``; skipped when it is None).
    ``target``: the family's layer preset (default ``full`` when ``conv_rank`` is given and the family has
    it, else ``attn_mlp`` / its first preset); text encoders are included.  Layers whose difference is at
    most ``min_diff`` (max abs) are left out; biases and norms are not represented.  The file is written with the
    family's export rules (original layer names, e.g. a fused ``qkv``) and its diffusers-layout side file where
    training writes one.  DiT families compare the transformers alone: a folder or a transformer single file
    (their text encoders are separate files)."""
    import architectures
    arch = architectures.get(arch_id)
    rank = int(rank)
    if rank < 1:
        raise ValueError("rank must be ≥ 1")
    if conv_rank is not None and int(conv_rank) < 1:
        conv_rank = None
    presets = arch.adapter_presets
    if target is None:
        target = "full" if conv_rank and "full" in presets else ("attn_mlp" if "attn_mlp" in presets else presets[0])
    if target not in presets:
        raise ValueError(f"target {target!r} is not a preset of {arch.label} ({', '.join(presets)})")
    dtype = _dtype(save_dtype)
    base = _load_components(arch, base_path, config_dir)
    tuned = _load_components(arch, tuned_path, config_dir)
    with_te = bool(base.text_encoders and tuned.text_encoders)
    base_targets = arch.adapter_targets(base, target, with_te)
    tuned_layers = {t.name: t.module for t in arch.adapter_targets(tuned, target, with_te)}
    out: dict[str, torch.Tensor] = {}
    has_conv = False
    with torch.no_grad():
        for t in base_targets:
            other = tuned_layers.get(t.name)
            if other is None:
                continue
            w0, w1 = t.module.weight.float(), other.weight.float()
            if w0.shape != w1.shape:
                raise ValueError(f"{t.name}: shapes differ ({tuple(w0.shape)} vs {tuple(w1.shape)}): "
                                 "not the same model architecture")
            d = w1 - w0
            if float(d.abs().max()) <= min_diff:
                continue
            kxk = d.dim() == 4 and tuple(d.shape[2:]) != (1, 1)
            r = int(conv_rank) if kxk else rank
            if kxk and not conv_rank:
                continue
            mat = d.reshape(d.shape[0], -1)
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            r = min(r, s.numel())
            root = s[:r].sqrt()
            up, down = u[:, :r] * root, root[:, None] * vh[:r]
            if d.dim() == 4:
                up = up.reshape(d.shape[0], r, 1, 1)
                down = down.reshape(r, *d.shape[1:])
                has_conv |= kxk
            out[f"{t.name}.lora_up.weight"] = up.to(dtype).contiguous()
            out[f"{t.name}.lora_down.weight"] = down.to(dtype).contiguous()
            out[f"{t.name}.alpha"] = torch.tensor(float(r), dtype=dtype)
    if not out:
        raise ValueError("the two models do not differ on any adapter layer (nothing to extract)")
    args = {"algo": "locon" if has_conv else "lora", "target": target}
    if has_conv:
        args.update(conv_dim=str(conv_rank), conv_alpha=str(conv_rank))
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_network_args": json.dumps(args), "ss_base_model_version": arch.ss_base_model_version,
        "ss_output_name": Path(out_path).stem, "ss_sd_model_name": Path(base_path).name,
        "ss_training_comment": f"extracted: {Path(tuned_path).name} − {Path(base_path).name}, rank {rank}"
                               + (f", conv rank {conv_rank}" if has_conv else ""),
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch.modelspec_architecture,
        "modelspec.implementation": getattr(arch, "modelspec_implementation", "") or "",
        "modelspec.title": Path(out_path).stem, "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # the family's export: original names, and its diffusers-layout side file where it writes one
    written = write_adapter_files(unused_path(Path(out_path).expanduser()), out,
                                  lambda sha, suffix: {**metadata, "sshs_model_hash": sha},
                                  lambda sd: arch.export_adapter(base, sd))
    return written[0]


__all__ = ["adapter_summary", "format_summary", "merge_adapters", "resize_lora", "format_resize_report",
           "extract_lora", "RESIZE_MODES"]
