"""The inference benchmarks run end to end on the CPU with tiny random models (``--tiny``) and account for every
frame: a 21-latent-frame video is 81 pixel frames, whatever the block size and however the first block is handed
out. (The speeds themselves are measured on a GPU: docs/performance.md.)"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, out: Path, *args: str, runs: bool = True) -> dict:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *(["--runs", "1"] if runs else []),
                    "--out", str(out), *args], check=True, cwd=ROOT, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_bench_inference_counts_every_frame(tmp_path):
    result = run("bench_inference.py", tmp_path / "inference.json", "--modes", "chunk4", "frame2",
                 "--variants", "fast", "fast_whole_first")
    assert result["info"]["device"] == "cpu" and len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["pixel_frames"] == 81 and row["fps"] > 0 and row["dit_fps"] > 0
        assert 0 < row["first_frame_s"] <= row["first_block_s"] <= row["seconds"]


def test_bench_vae_decodes_the_whole_video(tmp_path):
    result = run("bench_vae.py", tmp_path / "vae.json", "--variants", "eager", "eager_fpc4")
    assert [row["variant"] for row in result["rows"]] == ["eager", "eager_fpc4"]
    assert all(row["frames"] == 25 for row in result["rows"])  # --tiny decodes 7 latent frames: 1 + 4 * 6


def test_profile_inference_runs_the_three_runs(tmp_path):
    result = run("profile_inference.py", tmp_path / "profile.json", "--top", "3", runs=False)
    assert [row["run"] for row in result["rows"]] == ["end_to_end", "dit_only", "decode_only"]
    assert all(row["wall_ms"] > 0 for row in result["rows"])  # no CUDA kernels on the CPU: only the walls count


def test_profile_busy_time_is_the_union_of_kernel_intervals():
    sys.path.insert(0, str(ROOT))
    from benchmarks.profile_inference import busy_time, kind_of

    assert busy_time([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4  # [0, 3] and [5, 6]
    assert busy_time([]) == 0
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma") == "attention"
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16") == "convolution"
    assert kind_of("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "gemm"
    assert kind_of("triton_poi_fused_gelu_view_3") == "compiled"


def test_probe_levers_host_runs_without_a_gpu(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_levers.py"), "host", "--out",
                    str(tmp_path / "probe.json")], check=True, cwd=ROOT, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "probe.json").read_text())["rows"]
    assert rows[0]["probe"] == "host" and rows[0]["sdpa_context_us"] > 0
