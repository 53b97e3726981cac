"""The Tools tab's merge, extract and resize on every DiT family (SD3, FLUX.1, FLUX.2, FLUX.3; tiny real-class models).

A LoRA is planted on the family's layers (SD3 with ``full-lin``, which reaches the last context block's modulation
that the original layout stores with its halves swapped), merged into the transformer's original single file, and
extracted back from that file against the base folder.  The extracted file has the planted file's keys (original
names) and side files, and merging it gives the same transformer; resizing keeps the names.  A transformer-only
single file (what merge and DiT full fine-tuning write) is what extract reads, as users' fine-tunes are."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import architectures
from architectures.base import ModelLoadError
from core.adapters import AdapterOptions, build_network
from core.tools import extract_lora, merge_adapters, resize_lora
from tests.tiny_models_dit import build_tiny_dit
from tests.tiny_models_flux2 import build_tiny_flux2
from tests.tiny_models_flux3 import build_tiny_flux3

CASES = [("sd3", build_tiny_dit, "full-lin"), ("flux1_dev", build_tiny_dit, "full-lin"),
         ("flux2_klein_4b", build_tiny_flux2, "attn_mlp"), ("flux3_klein", build_tiny_flux3, "attn_mlp")]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """arch_id → (model folder, planted adapter files by suffix, the merged single file)."""
    root = tmp_path_factory.mktemp("dit_tools")
    out = {}
    for arch_id, build, preset in CASES:
        folder = build(arch_id, root / arch_id, "diffusers")["model"]
        arch = architectures.get(arch_id)
        comps = arch.load(folder, None, torch.float32)
        net = build_network(arch.adapter_targets(comps, preset, False), "lora", 4, 2.0, 0.0, AdapterOptions())
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.03 * torch.randn(p.shape, generator=g))
        files = arch.export_adapter(comps, net.export_state_dict(torch.float32))
        adapter = root / f"{arch_id}-planted.safetensors"
        save_file(files[""], str(adapter))
        merged = merge_adapters(arch_id, folder, [(adapter, 1.0)], root / f"{arch_id}-tuned.safetensors",
                                save_dtype="fp32")
        out[arch_id] = (folder, files, adapter, merged, preset)
    return out


@pytest.mark.parametrize("arch_id", [c[0] for c in CASES])
def test_extract_from_the_merged_single_file_gives_back_the_planted_lora(planted, tmp_path, arch_id):
    folder, files, adapter, merged, preset = planted[arch_id]
    extracted = extract_lora(arch_id, folder, merged, tmp_path / "extracted.safetensors", 4, config_dir=folder,
                             target=preset, save_dtype="fp32")
    sd = load_file(str(extracted))
    assert set(sd) == set(files[""])          # the original layout's names, swapped layer included
    assert all(torch.isfinite(v).all() for v in sd.values())
    for suffix in files:
        if suffix:                            # the family's diffusers-layout side file, written beside it
            side = extracted.with_name(f"{extracted.stem}{suffix}.safetensors")
            assert set(load_file(str(side))) == set(files[suffix])
    # rank 4 recovers a rank-4 difference exactly: merged again, it is the same transformer
    again = merge_adapters(arch_id, folder, [(extracted, 1.0)], tmp_path / "again.safetensors", save_dtype="fp32")
    want, got = load_file(str(merged)), load_file(str(again))
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)

    # resize keeps every name and halves the rank
    resized, report = resize_lora(extracted, tmp_path / "resized.safetensors", "fixed", 2)
    small = load_file(str(resized))
    assert set(small) == set(sd)
    assert {v.shape[0] for k, v in small.items() if k.endswith("lora_down.weight")} == {2}
    assert 0.0 < report["mean_retained"] < 1.0
    merge_adapters(arch_id, folder, [(resized, 1.0)], tmp_path / "resized-merged.safetensors", save_dtype="fp32")


def test_the_merged_file_differs_from_the_base_where_the_lora_was(planted, tmp_path):
    """The round trip above compares two merges: this checks that a merge changed the weights at all."""
    arch_id = "flux1_dev"
    folder, _, adapter, merged, _ = planted[arch_id]
    arch = architectures.get(arch_id)
    comps = arch.load_checkpoint_parts(folder, None, torch.float32)
    base = {arch.original_prefix + k: v for k, v in
            arch.to_original_layout(comps.denoiser.state_dict(), comps.denoiser.config).items()}
    tuned = load_file(str(merged))
    changed = {k for k in tuned if not torch.equal(tuned[k], base[k])}
    assert "double_blocks.0.img_attn.qkv.weight" in changed and "single_blocks.0.linear1.weight" in changed
    assert all(k.endswith(".weight") for k in changed)


def test_dit_merge_refuses_text_encoder_modules_and_files_of_another_family(planted, tmp_path):
    folder, files, _, merged, _ = planted["sd3"]
    with_te = {**files[""], "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 4)}
    path = tmp_path / "with_te.safetensors"
    save_file(with_te, str(path))
    with pytest.raises(ValueError, match="holds the transformer only"):
        merge_adapters("sd3", folder, [(path, 1.0)], tmp_path / "m.safetensors")
    flux_folder = planted["flux1_dev"][0]
    with pytest.raises(ModelLoadError, match="is not a FLUX.1 dev transformer in its original layout"):
        extract_lora("flux1_dev", flux_folder, merged, tmp_path / "x.safetensors", 4, config_dir=flux_folder)
