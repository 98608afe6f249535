"""The inference benchmarks run end to end on the CPU with tiny random models (``--tiny``) and account for every
frame: a 21-latent-frame video is 81 pixel frames, whatever the block size and the decoder. They run as a user runs
them, ``python benchmarks/<script>.py`` (the script's folder is on its import path; ``common`` puts the checkout
ahead of any installed one). (The speeds themselves are measured on a GPU: docs/performance.md.)"""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, out: Path, *args: str, runs: bool = True) -> dict:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *(["--runs", "1"] if runs else []),
                    "--out", str(out), *args], check=True, cwd=ROOT, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_bench_inference_counts_every_frame(tmp_path):
    result = run("bench_inference.py", tmp_path / "inference.json", "--modes", "chunk4", "frame2",
                 "--variants", "fast", "fast_preview", "fast_fp8", "--text_encoder")
    assert result["info"]["device"] == "cpu" and len(result["rows"]) == 6
    assert all(row["encode_s"] > 0 for row in result["rows"])   # prompts went through the (zero-weight) encoder
    # its memory is a loaded encoder's: one token embedding shared by its two modules, as tied in a checkpoint
    from transformers import UMT5EncoderModel

    from model.text_encoder import umt5_config
    from toy.folders import TINY_T5
    with torch.device("meta"):
        loaded = UMT5EncoderModel(umt5_config(**TINY_T5))
    assert loaded.shared.weight is loaded.encoder.embed_tokens.weight
    gib = sum(p.numel() * 2 for p in loaded.parameters()) / 2**30   # bf16
    assert all(abs(row["text_encoder_gib"] - gib) < 1e-9 for row in result["rows"])
    for row in result["rows"]:
        assert row["pixel_frames"] == 81 and row["fps"] > 0 and row["dit_fps"] > 0
        assert 0 < row["first_frame_s"] <= row["first_block_s"] <= row["seconds"]


def test_bench_vae_decodes_the_whole_video(tmp_path):
    result = run("bench_vae.py", tmp_path / "vae.json", "--variants", "eager", "preview")
    assert [row["variant"] for row in result["rows"]] == ["eager", "preview"]
    assert all(row["frames"] == 25 for row in result["rows"])  # --tiny decodes 7 latent frames: 1 + 4 * 6


def test_profile_inference_runs_the_ways_asked_for(tmp_path):
    result = run("profile_inference.py", tmp_path / "profile.json", "--top", "3", "--runs", "first_frame",
                 "end_to_end", runs=False)
    assert [row["run"] for row in result["rows"]] == ["end_to_end", "first_frame"]   # in the script's order
    assert all(row["wall_ms"] > 0 for row in result["rows"])  # no CUDA kernels on the CPU: only the walls count


def test_profile_busy_time_is_the_union_of_kernel_intervals():
    """The profiler's helpers, imported as the script imports its neighbours (from the benchmarks folder)."""
    check = """
import profile_inference as p
assert p.busy_time([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4  # [0, 3] and [5, 6]
assert p.busy_time([]) == 0
assert p.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma") == "attention"
assert p.kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16") == "convolution"
assert p.kind_of("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "gemm"
assert p.kind_of("triton_poi_fused_gelu_view_3") == "compiled"
# a timeline from the timed call's mark (ts 100 us): stream 7 works 0.1-0.3 and 0.8-1.0 ms, stream 9 0.3-0.5 ms
kernel = lambda ts, dur, stream, name: dict(cat="kernel", ts=ts, dur=dur, name=name, args=dict(stream=stream))
trace = dict(traceEvents=[dict(name=p.TIMED, ts=100.0, dur=1000.0), kernel(200, 200, 7, "a"), kernel(900, 200, 7, "b"),
                          kernel(400, 200, 9, "c")])
t = p.summarize(trace, 1e-3, top=2)["timeline"]
assert t["7"]["first_ms"] == 0.1 and t["7"]["last_ms"] == 1.0 and abs(t["7"]["busy_ms"] - 0.4) < 1e-9
assert [(round(g["ms"], 6), g["after"]) for g in t["7"]["idle_gaps"]] == [(0.5, "a")]
assert t["9"]["first_ms"] == 0.3 and t["9"]["idle_gaps"] == []
"""
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_profile_gpu_idle_tells_waiting_for_the_host_from_waiting_on_the_gpu():
    """A trace by hand: kernels a, c keep the GPU busy 0.1-0.5 ms after the timed call's mark; b starts 0.3 ms after c
    ends and was launched 0.25 ms into that gap, inside _hand_out (the host was late); d starts 0.2 ms after b ends
    but was launched before b ended (a CUDA graph's kernel, or one waiting on an event: not the host's)."""
    check = """
import profile_inference as p
kernel = lambda ts, dur, stream, name, corr: dict(cat="kernel", ts=ts, dur=dur, name=name,
                                                  args=dict(stream=stream, correlation=corr))
launch = lambda ts, name, corr: dict(cat="cuda_runtime", ts=ts, dur=5, name=name, args=dict(correlation=corr))
events = [dict(name=p.TIMED, ts=100.0, dur=2000.0, cat="user_annotation"),
          kernel(200, 200, 7, "a", 1), kernel(400, 200, 9, "c", 3), kernel(900, 200, 7, "b", 2),
          kernel(1300, 100, 9, "d", 4),
          launch(150, "cudaLaunchKernel", 1), launch(120, "cudaLaunchKernel", 3), launch(850, "cudaLaunchKernel", 2),
          launch(1000, "cudaGraphLaunch", 4),
          dict(cat="python_function", ts=800, dur=100, name="pipeline/streaming.py(123): _hand_out"),
          dict(cat="cpu_op", ts=840, dur=20, name="aten::copy_")]
idle = p.summarize(dict(traceEvents=events), 2e-3, top=2)["gpu_idle"]
assert idle["gaps"] == 2 and abs(idle["ms"] - 0.5) < 1e-9, idle
assert idle["host_late_gaps"] == 1 and abs(idle["host_late_ms"] - 0.3) < 1e-9, idle
first, second = idle["longest"]
assert (first["before"], first["after"], first["host_late"]) == ("c", "b", True), first
assert abs(first["ms"] - 0.3) < 1e-9 and abs(first["at_ms"] - 0.5) < 1e-9
assert abs(first["launched_ms_into_gap"] - 0.25) < 1e-9
assert first["host"] == ["aten::copy_", "pipeline/streaming.py(123): _hand_out"], first["host"]
assert (second["before"], second["after"], second["host_late"], second["launch"]) == ("b", "d", False,
                                                                                    "cudaGraphLaunch")
assert "host" not in second
"""
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bench_endless_records_flat_rows(tmp_path):
    result = run("bench_endless.py", tmp_path / "endless.json", runs=False)
    rows = result["rows"]
    assert [r["latent_frames"] for r in rows] == [6, 12, 18, 24] and result["info"]["window"] == [21, 3]
    assert len({r["cache_mib"] for r in rows}) == 1 and all(r["fps"] > 0 and r["host_rss_mib"] > 0 for r in rows)


def test_bench_text_encoder_times_both_ways(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nA red fox trots through fresh snow in a quiet pine forest at dawn\n")
    result = run("bench_text_encoder.py", tmp_path / "text.json", "--device", "cpu", "--prompts", str(prompts))
    rows = result["rows"]
    assert [row["prompt"][:12] for row in rows] == ["a red circle", "A red fox tr"]
    assert 0 < rows[0]["tokens"] < rows[1]["tokens"] == rows[1]["text_len"] == 16   # --tiny: text_len 16, truncated
    assert all(row["used_columns_s"] > 0 and row["all_columns_s"] > 0 for row in rows)


def test_bench_text_encoder_int8_timing_and_accuracy(tmp_path):
    result = run("bench_text_encoder.py", tmp_path / "int8.json", "--device", "cpu", "--int8")
    assert all(row["int8_s"] > 0 and len(row["int8_runs"]) == 1 for row in result["rows"])
    row = run("bench_text_encoder.py", tmp_path / "error.json", "--device", "cpu", "--accuracy", "--num_prompts", "2",
              runs=False)["rows"][0]
    # bf16 and int8 embeddings of a random tiny UMT5 against float32: both small, int8 the larger (groups of a row)
    assert 0 < row["embedding_error_bf16"] < row["embedding_error_int8"] < 0.1 and row["padding_zero"]
    assert len(row["layers"]) == 14 and all(0 < layer["bf16"] < layer["int8"] < 0.05 for layer in row["layers"])


def test_bench_text_encoder_host_memory_of_a_loaded_file(tmp_path):
    """The toy folder's Wan-format UMT5 file, loaded as --text_encoder_cpu loads it (memory-mapped)."""
    rows = run("bench_text_encoder.py", tmp_path / "host.json", "--host_memory", str(ROOT / "assets/toy/Toy-T2V"),
               runs=False)["rows"]
    assert [row["stage"] for row in rows] == ["start", "loaded", "encoded one prompt"]
    assert all(0 < row["anonymous_gib"] <= row["rss_gib"] <= row["peak_gib"] for row in rows)
    assert rows[2]["seconds"] > 0 and rows[1]["peak_gib"] <= rows[2]["peak_gib"]


def test_bench_toy_base_step_times_every_part(tmp_path):
    out = tmp_path / "toy_base_step.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_toy_base_step.py"), "--device", "cpu",
                    "--batch", "2", "--iters", "1", "--out", str(out)], check=True, cwd=tmp_path, capture_output=True,
                   timeout=600)
    result = json.loads(out.read_text())
    assert result["info"]["batch_size"] == 2 and result["info"]["config"] == "configs/toy/bidirectional_base.yaml"
    assert [row["part"] for row in result["rows"]] == ["draw_video", "draw_image", "encode", "step",
                                                        "video_fwd_bwd_fp32", "video_fwd_bwd_bf16"]
    assert all(row["ms"] > 0 for row in result["rows"])
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_toy_base_step.py"), "--device", "cpu",
                    "--batch", "2", "--iters", "1", "--parts", "encode", "--override", "text_encoder_cache_size=8",
                    "--out", str(out)], check=True, cwd=tmp_path, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert [row["part"] for row in result["rows"]] == ["encode"]
    assert result["info"]["overrides"] == ["text_encoder_cache_size=8"]


PROJECT_PACKAGES = ("app", "model", "pipeline", "toy", "trainer", "utils")


def test_every_benchmark_puts_its_own_checkout_first_before_importing_the_project():
    """A script's folder, not the repository, is on its import path, so ``model`` would come from whatever clone is
    installed editable: each benchmark imports ``common`` (which puts its checkout first) before any project
    package."""
    import ast

    late = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        if path.name == "common.py":
            continue
        seen_common = False
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            top = {name.split(".")[0] for name in names}
            seen_common |= bool(top & {"common", "bench_inference"})   # bench_inference imports common first
            if top & set(PROJECT_PACKAGES) and not seen_common:
                late.append(path.name)
                break
    assert not late, f"import common before the project's packages in {late}"


def test_benchmarks_import_this_checkout_and_not_another_installed_one(tmp_path):
    """Decoy packages of every project name ahead on the import path (as another clone's editable install would be)
    are not what a benchmark imports."""
    import os

    for name in PROJECT_PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the decoy {name}, not this checkout')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    for script in ("model_4090.py", "bench_toy_base_step.py"):
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "usage" in run.stdout, f"{script}: {run.stderr[-1500:]}"
