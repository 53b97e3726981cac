"""The tier benchmark's own code path (random weights from a config, the plan for a budget, the trainer's
setup_denoiser, timed LoRA steps) runs end to end on the CPU with a tiny model's config, so it does not rot
between the sessions that have a GPU to run it on."""
from bench.bench_tiers import markdown_table, run_one
from tests.tiny_models import build_tiny_sd15, tiny_config_dir


def test_tier_bench_child_runs_on_the_cpu(tmp_path):
    build_tiny_sd15(tmp_path, "single_file")
    row = run_one("sd15", 0.0, 64, steps=2, warmup=1, cpu=True, config_dir=tiny_config_dir("sd15", tmp_path))
    assert row["fits"], row
    assert row["s_per_it"] > 0 and row["estimate_gb"] >= 0 and row["device"] == "cpu"
    assert row["plan"].startswith("fp32, attn default")
    table = markdown_table([row, {"arch": "flux1_dev", "tier_gb": 8.0, "resolution": 1024, "fits": False,
                                  "error": "out of memory", "plan": "bf16"}])
    assert "| sd15 | 64 | CPU | yes |" in table and "| flux1_dev | 1024 | 8 GB | no |" in table
