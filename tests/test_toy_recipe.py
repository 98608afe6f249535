"""toy/recipe.py --quick end to end (CPU): every stage runs as the subprocess users would run, a few steps each,
and hands the next one a real file, so a broken hand-off (a checkpoint layout, a config key, an LMDB shape) fails here.

The run is shared by the module's tests (one recipe run, two stages side by side: 97 s against 140 one at a time on
2 AMD EPYC cores, where startup of the ~20 subprocesses dominates). It uses a tiny random Wan folder built here rather
than assets/toy, so it needs no shipped files and stays fast; the geometry is the toy world's (latents [9, 16, 8, 8],
33 frames of 64x64).
"""

import json
import subprocess
import sys

import pytest
import torch

from model.loader import build_wan_model, read_state_dict, save_release_checkpoint
from toy.folders import TINY_DIT, write_tiny_wan_folder
from toy.world import all_combinations, format_caption
from utils.config import load_config
from utils.video import read_mp4


@pytest.fixture(scope="module")
def recipe():
    import toy.recipe

    return toy.recipe


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("toy_recipe")
    kwargs = {}
    try:
        from toy.folders import toy_words
        kwargs["words"] = toy_words()
    except ImportError:
        pass
    folder = write_tiny_wan_folder(root / "Tiny", sentences=[format_caption(c) for c in all_combinations()],
                                   **kwargs)
    work = root / "work"
    tiny_dit = [f"{key}={json.dumps(value)}" for key, value in TINY_DIT.to_dict().items()]   # the folder's sizes
    cmd = [sys.executable, "-m", "toy.recipe", "--workdir", str(work), "--quick", "--device", "cpu",
           "--model_folder", str(folder), "--dit", *tiny_dit, "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"recipe failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return work, proc.stdout


def test_toy_configs_share_the_toy_world(recipe):
    """Fast (no run): every toy config loads through the schema, with the toy geometry and model folders."""
    for path in sorted(recipe.CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.image_or_video_shape == [1, 9, 16, 8, 8], path.name
        assert cfg.num_training_frames == (12 if cfg.rolling_forcing else 9), path.name   # rollouts of 9 to 12
        assert (cfg.height, cfg.width, cfg.num_frames, cfg.fps) == (64, 64, 33, 8), path.name
        assert cfg.negative_prompt == "" and cfg.wan_models_dir == "assets/toy", path.name
        assert {cfg.generator_name, cfg.real_name, cfg.fake_name, cfg.text_encoder_name} == {"Toy-T2V"}, path.name
        assert cfg.num_frame_per_block == (3 if "chunkwise" in path.stem else 1), path.name
        if path.stem.startswith("causal_forcing_dmd"):
            variant = "chunkwise" if "chunkwise" in path.stem else "framewise"
            assert cfg.generator_ckpt == f"assets/toy/checkpoints/{variant}/causal_forcing.pt"
    base = load_config(recipe.CONFIGS / recipe.STAGES["base"][0])
    assert not base.causal and base.trainer == "diffusion" and base.caption_dropout > 0
    assert base.image_loss_weight > 0 and base.first_frame_loss_weight > 1   # the shipped base's frame-0 terms
    root = load_config(recipe.CONFIGS / "base.yaml")   # ... and only the base's: the root every stage inherits keeps
    assert root.image_loss_weight == 0 and root.first_frame_loss_weight == 1   # the reference's loss
    # every file is a stage's, but the root that they all inherit
    assert {c for c, _ in recipe.STAGES.values()} | {"base.yaml"} == {p.name for p in recipe.CONFIGS.glob("*.yaml")}


def test_every_stage_checkpoint_exists_and_loads(quick_run, recipe):
    work, _ = quick_run
    cfg = load_config(recipe.CONFIGS / "base.yaml")
    base_folder = work / "models" / "base" / recipe.MODEL
    for name, (config, _) in recipe.STAGES.items():
        path = work / "checkpoints" / f"{name}.pt"
        assert path.is_file(), f"stage {name} wrote no {path}"
        stage = load_config(recipe.CONFIGS / config)
        # strict load into the architecture the next stage builds (causal unless it is the base)
        model = build_wan_model(base_folder, causal=stage.causal, num_frame_per_block=stage.num_frame_per_block,
                                checkpoint_path=path)
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
    x = torch.randn(1, *cfg.image_or_video_shape[1:])
    assert model(x, torch.full((1, x.shape[1]), 500.0), torch.randn(1, 4, model.config.text_dim)).shape == x.shape


def test_bf16_export_is_a_release_checkpoint_of_the_stage(quick_run, recipe, tmp_path):
    """What --ship and a device call bring back: the stage's weights in bf16, loadable as a release checkpoint."""
    work, _ = quick_run
    source = work / "checkpoints" / "dmd_chunkwise.pt"
    recipe.export_bf16(source, tmp_path / "causal_forcing.pt")
    expected, got = read_state_dict(str(source)), read_state_dict(str(tmp_path / "causal_forcing.pt"))
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], expected[k].to(torch.bfloat16)) for k in got)
    build_wan_model(work / "models" / "base" / recipe.MODEL, causal=True, num_frame_per_block=3,
                    checkpoint_path=tmp_path / "causal_forcing.pt")


def test_stages_chain_through_their_inputs(quick_run):
    """Each stage started from the file it was given: it stays closer to its input than to the input's input."""
    work, _ = quick_run

    def sd(name):
        return read_state_dict(str(work / "checkpoints" / f"{name}.pt"))

    def dist(a, b):
        return sum((a[k].float() - b[k].float()).pow(2).sum() for k in a).sqrt().item()

    base = read_state_dict(str(work / "models" / "base" / "Toy-T2V"))
    assert dist(base, sd("base")) == 0  # the exported base folder is the trained base
    ar, ode, dmd = sd("ar_framewise"), sd("ode_framewise"), sd("dmd_framewise")
    assert 0 < dist(ode, ar) < dist(ode, base)
    assert 0 < dist(dmd, ode) < dist(dmd, ar)
    ablation = sd("dmd_framewise_from_ar")
    assert dist(ablation, ar) < dist(ablation, ode)


def test_trajectory_lmdbs_have_the_student_slots(quick_run):
    from utils.lmdb_store import LMDBReader

    work, _ = quick_run
    for variant in ("framewise", "chunkwise"):
        reader = LMDBReader(work / "dataset" / f"ODE_{variant}")
        assert len(reader) >= 1
        assert reader.shape("latents")[1:] == (6, 9, 16, 8, 8)   # 4 student states + ODE output + ground truth


def test_final_inference_writes_videos_of_the_right_length(quick_run, recipe):
    work, stdout = quick_run
    prompts = [line for line in (work / "eval_prompts.txt").read_text().splitlines() if line]
    for row in recipe.QUICK_ROWS:
        videos = sorted((work / "samples" / row).glob("*.mp4"))
        assert len(videos) == len(prompts) * recipe.QUICK["num_samples"], row
        for path in videos:
            assert read_mp4(path).shape == (33, 64, 64, 3)
        result = json.loads((work / "eval" / f"{row}.json").read_text())[f"model:{row}"]
        assert result["aggregate"]["count"] == len(videos) == len(result["videos"])
        assert all(v["prompt"] in prompts for v in result["videos"])
    table = (work / "toy_results.md").read_text()
    assert "Causal Forcing DMD chunkwise" in table and "s/step" in table
    assert "written to" in stdout


# What Recipe.score_row returns for a row, as far as the results table reads it.
FAKE_SCORES = {"aggregate": {**dict.fromkeys(["faithfulness", "faithfulness_seen", "faithfulness_heldout", "color",
                                              "shape", "direction", "speed", "jitter_px", "presence_late"], 0.5),
                             "frame0_missing": 0, "count": 2},
               "videos": [{"prompt": "a red circle moving left slowly", "faithfulness": 0.5}]}


@pytest.fixture
def stubbed(recipe, monkeypatch):
    """The recipe with every stage, data step and row replaced by a record of its call (a stage writes an empty
    checkpoint); returns the list of calls."""
    calls = []

    def train(self, name):
        calls.append(name)
        self.ckpt(name).parent.mkdir(parents=True, exist_ok=True)
        self.ckpt(name).write_bytes(b"")
        return self.ckpt(name)

    monkeypatch.setattr(recipe.Recipe, "make_model_folders", lambda self: calls.append("models"))
    monkeypatch.setattr(recipe.Recipe, "make_data", lambda self: calls.append("data"))
    monkeypatch.setattr(recipe.Recipe, "export_base", lambda self: calls.append("export_base"))
    monkeypatch.setattr(recipe.Recipe, "ode_data", lambda self, v: calls.append(f"ode_data_{v}"))
    monkeypatch.setattr(recipe.Recipe, "train", train)
    monkeypatch.setattr(recipe.Recipe, "score_row", lambda self, row, prompts: calls.append(f"sample {row.name}")
                        or FAKE_SCORES)
    return calls


def test_until_stops_after_a_stage_and_samples_only_existing_models(recipe, tmp_path, stubbed):
    """``--until`` trains the stages up to the named one (in recipe order), skips the data when no remaining stage
    reads it, samples only rows whose checkpoints exist and writes the partial table into the workdir."""
    calls = stubbed
    work = tmp_path / "work"
    argv = ["--workdir", str(work), "--device", "cpu", "--until", "ode_framewise"]
    assert recipe.main(argv) == 0
    assert calls == ["models", "data", "base", "export_base", "ar_framewise", "ar_chunkwise", "ode_data_framewise",
                     "ode_framewise", "sample base_50", "sample ar_framewise_50", "sample ar_framewise_4",
                     "sample ode_framewise_4", "sample ar_chunkwise_50", "sample ar_chunkwise_4"]
    assert "| causal ODE init framewise | 4 |" in (work / "toy_results.md").read_text()
    calls.clear()   # everything up to there exists: no data, no ODE trajectories (only training reads them)
    recipe.main(argv + ["--rows", "base_50"])
    assert calls == ["models", "base", "export_base", "ar_framewise", "ar_chunkwise", "ode_framewise",
                     "sample base_50"]


def test_only_trains_the_named_stages_from_checkpoints_already_there(recipe, tmp_path, stubbed):
    """``--only`` runs the named stages alone and scores their rows; the stages they start from must have
    checkpoints (one line naming them otherwise); a base checkpoint from elsewhere becomes the base's Wan folder."""
    calls = stubbed
    work = tmp_path / "work"
    argv = ["--workdir", str(work), "--device", "cpu", "--only", "dmd_chunkwise", "--stage_override",
            "dmd_chunkwise:guidance_scale=1.5"]
    with pytest.raises(SystemExit):   # neither the base nor the chunk-wise ODE init is there
        recipe.main(argv)
    assert calls == []
    (work / "checkpoints").mkdir(parents=True)
    for name in ("base", "ode_chunkwise"):
        (work / "checkpoints" / f"{name}.pt").write_bytes(b"")
    assert recipe.main(argv) == 0
    assert calls == ["models", "export_base", "dmd_chunkwise", "sample dmd_chunkwise_4"]   # no data: DMD reads prompts
    calls.clear()
    (work / "checkpoints" / "dmd_chunkwise.pt").unlink()
    assert recipe.main(["--workdir", str(work), "--device", "cpu", "--only", "ar_framewise", "ode_framewise"]) == 0
    assert calls == ["models", "export_base", "data", "ar_framewise", "ode_data_framewise", "ode_framewise",
                     "sample ar_framewise_50", "sample ar_framewise_4", "sample ode_framewise_4"]


def test_ema_rows_are_scored_where_the_stage_keeps_an_ema(recipe, tmp_path, stubbed):
    """``dmd_framewise_4_ema`` (the stage's EMA weights) is a row only where the stage's export will hold
    ``generator_ema``: ``ema_weight > 0`` and the last step past ``ema_start_step``."""
    calls = stubbed
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    for name in ("base", "ode_framewise"):
        (work / "checkpoints" / f"{name}.pt").write_bytes(b"")
    argv = ["--workdir", str(work), "--device", "cpu", "--only", "dmd_framewise", "--steps", "dmd_framewise=300",
            "--stage_override", "dmd_framewise:ema_weight=0.9"]
    assert recipe.main(argv + ["dmd_framewise:ema_start_step=100"]) == 0
    assert calls[-2:] == ["sample dmd_framewise_4", "sample dmd_framewise_4_ema"]
    calls.clear()
    (work / "checkpoints" / "dmd_framewise.pt").unlink()
    assert recipe.main(argv + ["dmd_framewise:ema_start_step=300"]) == 0   # the export at step 300 holds no EMA yet
    assert calls[-1] == "sample dmd_framewise_4"


def test_ema_checkpoints_export_and_sample_their_ema(recipe, tmp_path):
    """A stage checkpoint with ``generator_ema`` gets an ``_ema`` row in toy.diagnose, and its bf16 export (what is
    shipped) holds the EMA weights; one without keeps its generator and has no ``_ema`` row."""
    from toy.diagnose import available_rows

    raw, ema = {"head.head.bias": torch.zeros(4)}, {"head.head.bias": torch.linspace(0.5, 2.0, 4)}
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    save_release_checkpoint(folder / "dmd_framewise.pt", raw, ema)
    save_release_checkpoint(folder / "dmd_chunkwise.pt", raw)
    rows = {row.name for row, _, _ in available_rows(tmp_path)}
    assert {"dmd_framewise_4", "dmd_framewise_4_ema", "dmd_chunkwise_4"} <= rows
    assert "dmd_chunkwise_4_ema" not in rows
    for stage, expected in (("dmd_framewise", ema), ("dmd_chunkwise", raw)):
        recipe.export_bf16(folder / f"{stage}.pt", tmp_path / f"{stage}_bf16.pt")
        got = read_state_dict(str(tmp_path / f"{stage}_bf16.pt"))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k].to(torch.bfloat16)) for k in got), stage


@pytest.mark.parametrize("with_ema", [True, False])
def test_the_base_folder_holds_the_base_ema_where_there_is_one(recipe, tmp_path, with_ema):
    """The base's Wan folder (its table row, every later stage's init, real score and critic) and ``--ship_base``
    take the base checkpoint's ``generator_ema`` where the base stage kept one, else its ``generator``."""
    from safetensors.torch import load_file

    from model.weights import WAN_DIT_WEIGHTS

    args = recipe.build_parser().parse_args(["--workdir", str(tmp_path / "w"), "--device", "cpu"])
    run = recipe.Recipe(args)
    write_tiny_wan_folder(run.models("init") / recipe.MODEL)
    raw, ema = {"head.head.bias": torch.zeros(4)}, {"head.head.bias": torch.linspace(0.5, 2.0, 4)}
    run.ckpt("base").parent.mkdir(parents=True)
    save_release_checkpoint(run.ckpt("base"), raw, ema if with_ema else None)
    run.export_base()
    got = load_file(str(run.models("base") / recipe.MODEL / WAN_DIT_WEIGHTS))
    assert torch.equal(got["head.head.bias"], (ema if with_ema else raw)["head.head.bias"])


def test_only_names_the_missing_checkpoints(recipe, tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--workdir", str(tmp_path), "--device", "cpu", "--only", "ode_framewise"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ar_framewise, base" in err and str(tmp_path / "checkpoints") in err


def test_base_weights_become_the_base_checkpoint(recipe, tmp_path):
    """``--base_weights``: a trained base (here a bf16 safetensors file, as shipped) is written as a float32
    ``checkpoints/base.pt`` that the loader reads back to the same values; the base stage then counts as done."""
    from safetensors.torch import save_file

    weights = {"blocks.0.self_attn.q.weight": torch.randn(4, 4).bfloat16(), "head.head.bias": torch.randn(4).bfloat16()}
    save_file(weights, str(tmp_path / "base.safetensors"))
    args = recipe.build_parser().parse_args(["--workdir", str(tmp_path / "w"), "--device", "cpu",
                                             "--base_weights", str(tmp_path / "base.safetensors")])
    run = recipe.Recipe(args)
    run.seed_base(tmp_path / "base.safetensors")
    loaded = read_state_dict(run.ckpt("base"))
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value.float())


def test_the_base_starts_from_toy_dit_with_the_edits(recipe, tmp_path):
    from toy.folders import TOY_DIT

    args = recipe.build_parser().parse_args(["--workdir", str(tmp_path), "--dit", "num_layers=2"])
    config = recipe.Recipe(args).dit_config()
    assert config == {"_class_name": "WanModel", **TOY_DIT.to_dict(), "num_layers": 2}


def test_stage_overrides_reach_only_their_stage(recipe, tmp_path, monkeypatch):
    args = recipe.build_parser().parse_args(["--workdir", str(tmp_path), "--override", "seed=3", "--stage_override",
                                             "dmd_chunkwise:guidance_scale=1.5", "dmd_chunkwise:lr=1e-5"])
    run = recipe.Recipe(args)
    commands = {}
    monkeypatch.setattr(recipe.Recipe, "run", lambda self, name, cmd, what: commands.setdefault(name, cmd))
    for name in ("dmd_chunkwise", "dmd_framewise"):
        with pytest.raises(SystemExit):          # the stub runs nothing, so the stage's export is missing
            run.train(name)
    overrides = {name: cmd[cmd.index("--override") + 1:] for name, cmd in commands.items()}
    assert overrides["dmd_chunkwise"][:3] == ["seed=3", "guidance_scale=1.5", "lr=1e-5"]
    assert overrides["dmd_framewise"][0] == "seed=3" and not any("guidance" in o for o in overrides["dmd_framewise"])
    for bad in ("dmd:lr=1", "dmd_chunkwise:lr"):
        args = recipe.build_parser().parse_args(["--workdir", str(tmp_path), "--stage_override", bad])
        with pytest.raises(SystemExit, match="STAGE:KEY=VALUE"):
            recipe.Recipe(args)


def test_dit_edits_are_checked(recipe):
    config = {"dim": 128, "num_layers": 4, "patch_size": [1, 2, 2]}
    assert recipe._dit_config(config, ["dim=256", "patch_size=[1,1,1]"]) == \
        {"dim": 256, "num_layers": 4, "patch_size": [1, 1, 1]}
    with pytest.raises(SystemExit, match="WanConfig field"):
        recipe._dit_config(config, ["layers=6"])
    with pytest.raises(SystemExit, match="must be JSON"):
        recipe._dit_config(config, ["patch_size=(1,1,1)"])


def test_jobs_run_stages_side_by_side_after_what_they_read(recipe, tmp_path, monkeypatch):
    """``--jobs 3``: each stage starts only after the stages it reads have ended, independent ones overlap, and
    every stage and row still runs exactly once."""
    import threading
    import time

    spans, lock = {}, threading.Lock()

    def train(self, name):
        start = time.perf_counter()
        time.sleep(0.2)
        with lock:
            spans[name] = (start, time.perf_counter())
        self.ckpt(name).parent.mkdir(parents=True, exist_ok=True)
        self.ckpt(name).write_bytes(b"")

    sampled = []
    monkeypatch.setattr(recipe.Recipe, "make_model_folders", lambda self: None)
    monkeypatch.setattr(recipe.Recipe, "make_data", lambda self: None)
    monkeypatch.setattr(recipe.Recipe, "export_base", lambda self: None)
    monkeypatch.setattr(recipe.Recipe, "ode_data", lambda self, v: None)
    monkeypatch.setattr(recipe.Recipe, "train", train)
    monkeypatch.setattr(recipe.Recipe, "score_row", lambda self, row, prompts: sampled.append(row.name)
                        or FAKE_SCORES)
    assert recipe.main(["--workdir", str(tmp_path / "w"), "--device", "cpu", "--jobs", "3",
                        "--results", str(tmp_path / "r.md")]) == 0
    assert sorted(spans) == sorted(recipe.STAGES)
    for name in recipe.STAGES:
        for need in recipe.stage_needs(name):
            assert spans[need][1] <= spans[name][0], f"{name} started before {need} ended"
    a, b = spans["ar_framewise"], spans["ar_chunkwise"]
    assert a[0] < b[1] and b[0] < a[1], "independent stages did not overlap"
    # every row but the DMD stages' EMA ones (no toy DMD config keeps an EMA)
    assert sorted(sampled) == sorted(r.name for r in recipe.table_rows()
                                     if not (r.use_ema and r.stage.startswith("dmd_")))
    with pytest.raises(SystemExit):
        recipe.main(["--workdir", str(tmp_path / "w"), "--jobs", "0"])
