"""The attention kernel choice (core.attention): the "auto" table, the refusals, and that the contexts change
nothing but the kernel (same results on the CPU) and override diffusers' dispatcher backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.attention import AttentionError, attention_context, check_attention, choose_attention
from core.hardware import GpuInfo


def gpu(cc, name="GPU"):
    return GpuInfo.from_capability(0, name, 24.0, 20.0, cc)


@pytest.mark.parametrize("device,precision,expected", [
    (None, "no", "default"),                       # CPU: PyTorch's CPU flash kernel beats math
    (gpu((7, 5), "T4"), "fp16", "efficient"),      # Turing: no flash kernels below sm80
    (gpu((7, 0), "V100"), "fp16", "efficient"),
    (gpu((8, 0), "A100"), "bf16", "flash"),
    (gpu((8, 6), "RTX 3090"), "fp16", "flash"),
    (gpu((8, 9), "RTX 4090"), "bf16", "flash"),
    (gpu((9, 0), "H100"), "bf16", "flash"),        # never PyTorch's default (cuDNN) on CUDA
    (gpu((12, 0), "RTX 5090"), "bf16", "flash"),
    (gpu((9, 0), "H100"), "no", "efficient"),      # fp32: flash needs half precision
    (gpu((8, 6), "RTX 3090"), "no", "efficient"),
])
def test_choice_table(device, precision, expected):
    name, reason = choose_attention(device, precision)
    assert name == expected and reason.startswith(f"attention {expected}")
    check_attention(name, device, precision)  # what auto picks is always allowed


def test_refusals():
    with pytest.raises(AttentionError, match=r"memory.attention = flash.*memory.mixed_precision.*'no'"):
        check_attention("flash", gpu((9, 0)), "no")
    with pytest.raises(AttentionError, match=r"memory.attention = cudnn.*memory.mixed_precision"):
        check_attention("cudnn", gpu((9, 0)), "no")
    with pytest.raises(AttentionError, match=r"compute capability 8.0.*7.5.*efficient"):
        check_attention("flash", gpu((7, 5), "T4"), "fp16")
    with pytest.raises(AttentionError, match="needs an NVIDIA GPU"):
        check_attention("cudnn", None, "no")
    with pytest.raises(AttentionError, match="needs an NVIDIA GPU"):
        check_attention("efficient", None, "no")
    with pytest.raises(AttentionError, match="unknown"):
        check_attention("xformers", gpu((9, 0)), "bf16")
    for ok in [("math", gpu((9, 0)), "no"), ("default", gpu((9, 0)), "no"), ("efficient", gpu((7, 5)), "no"),
               ("flash", None, "no"), ("cudnn", gpu((9, 0)), "bf16"), ("math", None, "no")]:
        check_attention(*ok)


def _attention_step(q, k, v):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("name", ["math", "default", "flash"])
def test_context_gives_same_results_on_cpu(name):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g) for _ in range(3))
    ref = _attention_step(q, k, v)
    with attention_context(name):
        got = _attention_step(q, k, v)
    for a, b in zip(got, ref):
        if name == "default":
            assert torch.equal(a, b)  # no context at all
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_context_sets_and_restores_backends():
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    with attention_context("math"):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
    with attention_context("flash"):
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # the kernel that crashed FLUX backward
    with attention_context("efficient"):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert flags == (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())


def test_context_overrides_diffusers_dispatcher():
    """FLUX.1 / FLUX.2 processors go through diffusers' dispatch_attention_fn: inside the context its active
    backend is "native" (plain SDPA, governed by sdpa_kernel) whatever was set before; restored after."""
    from diffusers.models.attention_dispatch import (AttentionBackendName, _AttentionBackendRegistry,
                                                     dispatch_attention_fn)
    before = _AttentionBackendRegistry._active_backend
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName._NATIVE_MATH)
    try:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, 32, 2, 8, generator=g) for _ in range(3))  # (batch, seq, heads, dim)
        ref = dispatch_attention_fn(q, k, v)
        with attention_context("math"):
            assert _AttentionBackendRegistry._active_backend == AttentionBackendName.NATIVE
            torch.testing.assert_close(dispatch_attention_fn(q, k, v), ref)
        assert _AttentionBackendRegistry._active_backend == AttentionBackendName._NATIVE_MATH
        with attention_context("default"):  # "default" leaves diffusers' setting alone
            assert _AttentionBackendRegistry._active_backend == AttentionBackendName._NATIVE_MATH
    finally:
        _AttentionBackendRegistry.set_active_backend(before)


def test_diffusers_unet_attention_same_under_context():
    """SD1.5/SDXL's AttnProcessor2_0 calls SDPA directly: same output with the math kernel on the CPU."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, processor=AttnProcessor2_0()).eval()
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=ctx)
        with attention_context("math"):
            got = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
