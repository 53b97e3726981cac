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
    from core.hardware import detect_hardware
    assert row["plan"].startswith(f"{'bf16' if detect_hardware().cpu_bf16 else 'fp32'}, attn default")
    table = markdown_table([row, {"arch": "flux1_dev", "tier_gb": 8.0, "resolution": 1024, "fits": False,
                                  "error": "out of memory", "plan": "bf16"}])
    assert "| sd15 | 64 | CPU | yes |" in table and "| flux1_dev | 1024 | 8 GB | no |" in table


def test_block_swap_bench_runs_its_check_on_the_cpu():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "bench/bench_block_swap.py", "--cpu"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("max |out diff| 0, max rel grad diff 0;") == 2, proc.stdout
    assert "full fine-tune: max rel weight diff 0 after 3 steps" in proc.stdout, proc.stdout


def test_step_bench_runs_both_sides_on_the_cpu(tmp_path):
    """bench_step.py --cpu: the plain diffusers + peft step and ours, in fp32 and bf16, on a tiny UNet config."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    build_tiny_sd15(tmp_path, "single_file")
    proc = subprocess.run([sys.executable, "bench/bench_step.py", "sd15", "--cpu", "--config-dir",
                           str(tiny_config_dir("sd15", tmp_path)), "--resolution", "64", "--batch", "1", "--steps", "1",
                           "--warmup", "1", "--precision", "fp32", "bf16", "--threads", "1"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for precision in ("fp32", "bf16"):
        for side in ("diffusers+peft", "ours"):
            line = re.search(rf"^sd15  64px b1 {precision}  {re.escape(side)} +(\d+\.\d+) s/it "
                             rf"\( *(\d+\.\d+) CPU s/it\)", proc.stdout, re.M)
            assert line and float(line[1]) > 0 and float(line[2]) > 0, proc.stdout
        # both sides train the same layers at the same rank
        params = re.findall(rf"^sd15  64px b1 {precision} .*lora params (\d+\.\d+) M", proc.stdout, re.M)
        assert len(params) == 2 and params[0] == params[1], proc.stdout
        assert re.search(rf"^sd15  {precision} speed ratio ours / diffusers\+peft: \d+\.\d+x "
                         rf"\(CPU time \d+\.\d+x\)$", proc.stdout, re.M)
