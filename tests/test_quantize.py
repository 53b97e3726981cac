"""Quantized frozen base (core.quantize): a LoRA trains on a qint8 / qfloat8 SD1.5 UNet through the real
objective, every adapter algorithm trains on a quantized base (or would be refused), the quantized model stays
close to the full-precision one, nf4 and full fine-tuning are refused with clear messages, text encoders
quantize, and qint4 needs no compiled extension.

Tolerances: relative L2 error against full precision, tiny random-weight models, every Linear layer
quantized but the default exclusions (random weights quantize worse than trained ones, and the tiny CLIP is
too narrow for qint4's groups of 128).
  UNet prediction: qint8 1%, qfloat8 4%, qint4 12%   (measured 0.25%, 1.3%, 4.2%)
  CLIP hidden states / pooled: qint8 2%, qfloat8 8%, qint4 25%   (measured 0.85%, 4.1%, 17%)
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import architectures
from core.adapters import AdapterOptions, build_network
from core.adapters.network import ALGORITHMS
from core.quantize import (QuantizationError, check_quantization, dense_weight_shape, dequantized_weight,
                           is_quantized, quantize_frozen, select_layers)
from core.trainer import diffusion_loss
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings

quanto = pytest.importorskip("optimum.quanto")

TOLERANCE = {"qint8": 0.01, "qfloat8": 0.04, "qint4": 0.12}
TE_TOLERANCE = {"qint8": 0.02, "qfloat8": 0.08, "qint4": 0.25}
STORAGE = {"qint8": torch.int8, "qfloat8": torch.float8_e4m3fn, "qint4": torch.uint8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    path = build_tiny_sd15(tmp / "sd15")
    data = build_tiny_dataset(tmp / "data", n=2)
    arch = architectures.get("sd15")
    comps = arch.load(path, None, torch.float32)
    for m in [comps.denoiser, comps.vae, *comps.text_encoders]:
        m.requires_grad_(False)
    settings, _ = tiny_train_settings("sd15", {"model.model_path": str(path)}, data, tmp)
    arch.configure_objective(comps, settings)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    cond = arch.encode_text(comps, arch.tokenize(comps, ["a red disc", "blue stripes"]), 1)
    return arch, comps, settings, latents, cond


def fresh(tiny, method=None, **kw):
    arch, comps, settings, latents, cond = tiny
    c = copy.copy(comps)
    c.denoiser = copy.deepcopy(comps.denoiser)
    kw.setdefault("keep", arch.quantize_keep)
    report = quantize_frozen(c.denoiser, method, min_elements=0, **kw) if method else None
    return c, report


def loss_at(tiny, comps, seed=0):
    arch, _, settings, latents, cond = tiny
    torch.manual_seed(seed)  # same noise and timesteps: the loss of one fixed batch
    return diffusion_loss(arch, comps, latents, cond, {}, settings, torch.float32, contextlib.nullcontext)


def prediction(tiny, comps):
    arch, _, _, latents, cond = tiny
    with torch.no_grad():
        return arch.predict(comps, latents, torch.tensor([100, 700]), cond, {})


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def train(tiny, comps, algo, steps=4, lr=1e-2, target="attn_mlp", **opts):
    arch = tiny[0]
    net = build_network(arch.select_adapter_targets(comps, target, False), algo, 4, 2.0, 0.0,
                        AdapterOptions(**opts))
    net.apply_to()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    net.train()
    with torch.no_grad():
        first = float(loss_at(tiny, comps))
    for _ in range(steps):
        loss = loss_at(tiny, comps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        last = float(loss_at(tiny, comps))
    changed = sum(not torch.equal(before[k], v) for k, v in net.named_parameters())
    return net, first, last, changed


# -- quantizing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["qint8", "qfloat8"])
def test_lora_trains_on_quantized_unet(tiny, method):
    comps, report = fresh(tiny, method)
    qlinear = [m for m in comps.denoiser.modules() if isinstance(m, quanto.nn.QLinear)]
    assert len(qlinear) == len(report.quantized) > 20
    for m in qlinear:
        assert m.weight.data._data.dtype == STORAGE[method]
        assert not m.weight.requires_grad
    assert report.bytes_after < 0.3 * report.bytes_before + 1024 * len(qlinear)
    data_before = {id(m): m.weight.data._data.clone() for m in qlinear}

    net, first, last, changed = train(tiny, comps, "lora")
    assert last < first * 0.99, (first, last)
    assert changed == len(list(net.parameters()))  # lora_up of every module (zero-initialised) moved too
    for m in qlinear:  # the base stays frozen
        assert torch.equal(m.weight.data._data, data_before[id(m)])
    # the adapters wrap the quantized layers
    assert all(isinstance(a.base, quanto.nn.QLinear) for a in net.adapters.values() if a.base in set(qlinear))


@pytest.mark.parametrize("method", ["qint8", "qfloat8", "qint4"])
def test_quantized_prediction_stays_close(tiny, method):
    dense, _ = fresh(tiny)
    quant, report = fresh(tiny, method)
    err = rel_err(prediction(tiny, quant), prediction(tiny, dense))
    assert err < TOLERANCE[method], err
    assert report.bytes_after < report.bytes_before


def test_family_keep_patterns_and_size_threshold(tiny):
    comps, report = fresh(tiny, "qint8")
    names = dict(comps.denoiser.named_modules())
    for kept in ("time_embedding.linear_1", "time_embedding.linear_2",
                 "down_blocks.0.resnets.0.time_emb_proj"):
        assert kept in report.kept and not is_quantized(names[kept])
    assert is_quantized(names["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"])
    chosen, kept = select_layers(fresh(tiny)[0].denoiser, keep=tiny[0].quantize_keep, min_elements=0)  # the estimate's
    assert chosen == report.quantized and kept == report.kept
    # with the real threshold the tiny model's layers (≤ 64×256) are all too small to be worth it
    comps2, _ = fresh(tiny)
    report2 = quantize_frozen(comps2.denoiser, "qint8", min_elements=65536)
    assert report2.quantized == [] and report2.bytes_before == 0
    # extra patterns
    comps3, _ = fresh(tiny)
    report3 = quantize_frozen(comps3.denoiser, "qint8", min_elements=0, keep=["*.ff.*"])
    assert report3.quantized and not any(".ff." in n for n in report3.quantized)
    assert "time_embedding.linear_1" in report3.quantized   # only what ``keep`` names is kept


def test_refuses_unfrozen_model(tiny):
    comps, _ = fresh(tiny)
    comps.denoiser.requires_grad_(True)
    with pytest.raises(QuantizationError, match="freeze"):
        quantize_frozen(comps.denoiser, "qint8")


def test_refuses_model_with_adapters_attached(tiny):
    comps, _ = fresh(tiny)
    net = build_network(tiny[0].select_adapter_targets(comps, "attn", False), "lora", 4, 2.0)
    net.apply_to()
    with pytest.raises(QuantizationError, match="before the adapters are attached"):
        quantize_frozen(comps.denoiser, "qint8", min_elements=0)


def test_input_dtype_follows_weight(tiny):
    """A bf16 activation into an fp32-quantized layer (quanto's CPU int8 kernel would fail) is cast."""
    layer = nn.Linear(64, 32)
    ref = layer(torch.ones(2, 64))
    holder = nn.Sequential(layer).requires_grad_(False)
    quantize_frozen(holder, "qint8", min_elements=0)
    out = holder(torch.ones(2, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and rel_err(out, ref) < 0.02


# -- every adapter algorithm on a quantized base ------------------------------------------------------

ALGO_CASES = [(a, "attn_mlp", {}) for a in ALGORITHMS if a != "locon"] + [
    ("locon", "full", dict(dora=True)), ("lora", "attn_mlp", dict(dora=True)), ("loha", "attn_mlp", dict(dora=True)),
    ("lokr", "attn_mlp", dict(dora=True, factor=4))]


@pytest.mark.parametrize("algo,target,opts", ALGO_CASES, ids=lambda v: str(v) if not isinstance(v, dict)
                         else "-".join(k for k in v if v[k] is True))
def test_every_algorithm_trains_on_quantized_base(tiny, algo, target, opts):
    comps, _ = fresh(tiny, "qint8")
    lr = 1e-2 if algo != "ia3" else 5e-2
    net, first, last, changed = train(tiny, comps, algo, steps=2, lr=lr, target=target, **opts)
    assert torch.isfinite(torch.tensor(last)) and last < first, (first, last)
    assert changed > 0
    # each adapted quantized layer computes Wq·x + b + ΔW'·x, ΔW' from the dense (dequantized) base weight
    adapter = next(a for a in net.adapters.values() if is_quantized(a.base))
    assert adapter.shape == dense_weight_shape(adapter.base)
    x = torch.randn(3, adapter.in_dim)
    net.eval()
    with torch.no_grad():
        w = dequantized_weight(adapter.base)
        expected = nn.functional.linear(x, w + adapter.effective_delta(), adapter.base.bias)
        assert rel_err(adapter.base(x), expected) < 1e-4


def test_dora_magnitude_from_quantized_weight(tiny):
    comps, _ = fresh(tiny, "qint8")
    net = build_network(tiny[0].select_adapter_targets(comps, "attn", False), "lora", 4, 2.0, 0.0,
                        AdapterOptions(dora=True))
    a = next(iter(net.adapters.values()))
    assert is_quantized(a.base)
    assert torch.allclose(a.dora_scale.flatten(), dequantized_weight(a.base).norm(dim=0))
    # at the start the DoRA layer reproduces the quantized layer
    x = torch.randn(2, a.in_dim)
    with torch.no_grad():
        plain = a.base(x)
        net.apply_to()
        assert torch.allclose(a.base(x), plain, atol=1e-5)


# -- refusals -----------------------------------------------------------------------------------------

def test_nf4_refused_without_cuda(tiny):
    with pytest.raises(QuantizationError, match="nf4 needs an NVIDIA GPU.*qint4"):
        check_quantization("nf4", algorithm="lora", device_type="cpu")
    comps, _ = fresh(tiny)
    with pytest.raises(QuantizationError, match="nf4"):
        quantize_frozen(comps.denoiser, "nf4")
    assert not any(is_quantized(m) for m in comps.denoiser.modules())


def test_full_finetune_refused():
    from core.full_finetune import FULL_FINETUNE
    with pytest.raises(QuantizationError, match="memory.quantize_base = qint8.*full_finetune.*none"):
        check_quantization("qint8", algorithm=FULL_FINETUNE)
    with pytest.raises(QuantizationError, match="quantize_text_encoder"):
        check_quantization("qint4", algorithm=FULL_FINETUNE, setting="memory.quantize_text_encoder")
    check_quantization("qint8", algorithm="full")  # LyCORIS "full" is an adapter: fine
    check_quantization("none", algorithm=FULL_FINETUNE)
    with pytest.raises(QuantizationError, match="unknown"):
        check_quantization("int3", algorithm="lora")


# -- text encoders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["qint8", "qfloat8", "qint4"])
def test_text_encoder_quantization_keeps_outputs(tiny, method):
    arch, comps, _, _, _ = tiny
    te = comps.text_encoders[0]
    ids = arch.tokenize(comps, ["a red disc on a white ground", "blue stripes"])[0]
    with torch.no_grad():
        ref = te(ids, output_hidden_states=True)
        qte = copy.deepcopy(te)
        report = quantize_frozen(qte, method, min_elements=0)
        out = qte(ids, output_hidden_states=True)
    assert len(report.quantized) == 2 * 6  # q, k, v, out_proj, fc1, fc2 of both layers
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < TE_TOLERANCE[method]
    assert rel_err(out.hidden_states[-2], ref.hidden_states[-2]) < TE_TOLERANCE[method]  # clip skip 2
    assert rel_err(out.pooler_output, ref.pooler_output) < TE_TOLERANCE[method]


# -- qint4 without a compiler -------------------------------------------------------------------------

def test_qint4_uses_no_compiled_extension(tiny):
    from optimum.quanto.library.extensions import extension as qext
    from optimum.quanto.tensor.packed import PackedTensor

    from core.quantize import PATCHED_EXTENSIONS, _PureTorchLib

    comps, report = fresh(tiny, "qint4")
    assert report.quantized
    assert not qext._extensions  # AWQ / Marlin kernels can never be picked
    # quanto's CPU (and, on NVIDIA machines, CUDA) unpack kernel is routed to PyTorch ops: nothing is compiled
    assert "quanto_cpp" in [e.name for e in PATCHED_EXTENSIONS]
    assert all(isinstance(e._lib, _PureTorchLib) for e in PATCHED_EXTENSIONS)
    t = torch.randint(0, 16, (40, 24), dtype=torch.uint8)
    packed = PackedTensor.pack(t, bits=4)
    assert torch.equal(packed.unpack(), t)
    layer = next(m for m in comps.denoiser.modules() if is_quantized(m))
    assert layer.weight.data._data._data.dtype == torch.uint8  # packed 4-bit
    net, first, last, _ = train(tiny, comps, "lora", steps=2)
    assert last < first


# -- NVIDIA GPU (skipped on CPU machines) ---------------------------------------------------------------

CUDA_METHODS = ["qint8", "qfloat8", "qint4", "nf4"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("method", CUDA_METHODS)
def test_cuda_bf16_quantized_lora_trains(tiny, method):
    """The GPU path as the trainer runs it: bf16 weights quantized layer by layer onto the GPU, a LoRA (and a
    DoRA) trains under bf16 autocast with the flash attention context, and the output stays close."""
    if method == "nf4":
        pytest.importorskip("bitsandbytes")
    bf16_run(tiny, method, torch.device("cuda"), "flash")


@pytest.mark.parametrize("method", ["qint8"])
def test_cpu_bf16_quantized_lora_trains(tiny, method):
    """The same with bf16 weights and bf16 autocast on the CPU (mixed dtypes: fp32 adapters, bf16 base)."""
    bf16_run(tiny, method, torch.device("cpu"), "default", steps=2, variants=({},))


def bf16_run(tiny, method, dev, attention, steps=4, variants=({}, {"dora": True})):
    from core.attention import attention_context
    arch, comps, settings, latents, cond = tiny
    autocast = lambda: torch.autocast(dev.type, torch.bfloat16)  # noqa: E731
    c = _with_denoiser(comps, copy.deepcopy(comps.denoiser).to(torch.bfloat16))
    dense = copy.deepcopy(c.denoiser).to(dev)
    report = quantize_frozen(c.denoiser, method, min_elements=0, device=dev)
    c.denoiser.to(dev)
    assert report.quantized and report.bytes_after < report.bytes_before
    assert all(m.weight.device.type == dev.type for m in c.denoiser.modules() if is_quantized(m))
    lat, cnd = latents.to(dev), {k: v.to(dev, torch.bfloat16) for k, v in cond.items()}
    t = torch.tensor([100, 700], device=dev)
    with torch.no_grad(), autocast(), attention_context(attention):
        ref = arch.predict(_with_denoiser(c, dense), lat.to(torch.bfloat16), t, cnd, {}).float()
        got = arch.predict(c, lat.to(torch.bfloat16), t, cnd, {}).float()
    assert rel_err(got, ref) < {"qint8": 0.03, "qfloat8": 0.06, "qint4": 0.15, "nf4": 0.15}[method]
    for opts in variants:
        net = build_network(arch.select_adapter_targets(c, "attn_mlp", False), "lora", 4, 2.0, 0.0,
                            AdapterOptions(**opts))
        net.to(dev, torch.float32)
        net.apply_to()
        assert all(a.shape == dense_weight_shape(a.base) for a in net.adapters.values())
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        losses = []
        for _ in range(steps + 1):
            torch.manual_seed(0)
            with attention_context(attention):
                loss = diffusion_loss(arch, c, lat, cnd, {}, settings, torch.bfloat16, autocast)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        net.restore()
        assert losses[-1] < losses[0], (opts, losses)


def _with_denoiser(c, denoiser):
    out = copy.copy(c)
    out.denoiser = denoiser
    return out
