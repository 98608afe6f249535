"""Published YAMLs load unchanged and keep their published meaning (issue 22): thu-ml/Causal-Forcing's
``configs/*.yaml`` and ``long_video/configs/*.yaml``, Self Forcing's ``configs/self_forcing_dmd.yaml``.

The files are written here from their key names and values (facts of the format), every published key with its
published value, and go through ``load_config``, ``python -m app.config``, train.py and inference.py.
"""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import inference
import train
from app.cli import config_from_args
from tests.conftest import write_tiny_stream_config
from utils.config import WAN_NEGATIVE_PROMPT, config_to_dict, config_to_yaml, grad_accum_steps, load_config
from utils.config_compat import COMPAT_KEYS
from utils.errors import ConfigError

FOUR = "[1000, 750, 500, 250]"
SHAPE = "[1, 21, 16, 60, 104]"
WANDB = {"wandb_host": "https://api.wandb.ai", "wandb_key": "{your key}", "wandb_entity": "{your entity}",
         "wandb_project": "{your project}"}
WRAPS = {f"{n}_fsdp_wrap_strategy": "size" for n in ("generator", "real_score", "fake_score", "text_encoder")}
# Keys of the AR, CD and DMD files (their values where all agree); YAML text, so `{your key}` stays a placeholder.
SHARED = {
    **WRAPS, "warp_denoising_step": "true", "ts_schedule": "false", "num_train_timestep": "1000",
    "timestep_shift": "5.0", "guidance_scale": "3.0", "denoising_loss_type": "flow", "mixed_precision": "true",
    "seed": "0", **WANDB, "sharding_strategy": "hybrid_full", "lr": "2.0e-06", "lr_critic": "4.0e-07",
    "beta1": "0.0", "beta2": "0.999", "beta1_critic": "0.0", "beta2_critic": "0.999", "batch_size": "1",
    "ema_weight": "0.99", "total_batch_size": "8", "negative_prompt": f"'{WAN_NEGATIVE_PROMPT}'",
    "dfake_gen_update_ratio": "5", "image_or_video_shape": SHAPE, "distribution_loss": "dmd",
    "gradient_checkpointing": "true", "load_raw_video": "false", "model_kwargs": "{timestep_shift: 5.0}",
}
DEFAULTS = {  # configs/default_config.yaml (Causal Forcing and Self Forcing alike)
    "independent_first_frame": "false", "warp_denoising_step": "false", "weight_decay": "0.01",
    "same_step_across_blocks": "true", "discriminator_lr_multiplier": "1.0", "last_step_only": "false",
    "i2v": "false", "num_training_frames": "21", "gc_interval": "100", "context_noise": "0", "causal": "true",
    "ckpt_step": "0", "prompt_name": "MovieGenVideoBench", "prompt_path": "prompts/MovieGenVideoBench.txt",
    "eval_first_n": "64", "num_samples": "1", "height": "480", "width": "832", "num_frames": "81",
}


def _ar(k):
    return {**SHARED, "real_name": "Wan2.1-T2V-1.3B", "ema_start_step": "2000000000", "log_iters": "1000",
            "trainer": "diffusion", "num_frame_per_block": str(k), "data_path": "dataset/clean_data",
            "teacher_forcing": "true"}


def _cd(k, v):
    return {**SHARED, "generator_ckpt": f"checkpoints/{v}/ar_diffusion.pt", "real_name": "Wan2.1-T2V-1.3B",
            "denoising_step_list": FOUR, "ema_start_step": "200", "log_iters": "1000",
            "trainer": "consistency_distillation", "num_frame_per_block": str(k), "data_path": "dataset/clean_data",
            "grad_accum": "1", "spatial_sf": "true", "teacher_forcing": "True", "causal": "True", "is_causal": "True",
            "discrete_cd_N": "48"}


def _dmd(k, v, steps=FOUR, first=None):
    out = {**SHARED, "generator_ckpt": f"checkpoints/{v}/causal_ode.pt", "real_name": "Wan2.1-T2V-14B",
           "denoising_step_list": steps, "ema_start_step": "200", "log_iters": "250", "trainer": "score_distillation",
           "num_frame_per_block": str(k), "data_path": "prompts/vidprom_filtered_extended.txt"}
    return {**out, "denoising_step_list_first_chunk": first} if first else out


def _ode(k, v):
    return {"generator_ckpt": f"checkpoints/{v}/ar_diffusion.pt", "generator_grad": "{model: true}",
            "denoising_step_list": FOUR, "warp_denoising_step": "true", "generator_task": "causal_video",
            "generator_fsdp_wrap_strategy": "size", "text_encoder_fsdp_wrap_strategy": "size",
            "mixed_precision": "true", "seed": "0", **WANDB, "wandb_name": "ode", "sharding_strategy": "hybrid_full",
            "lr": "2.0e-06", "beta1": "0.9", "beta2": "0.999", "data_path": f"dataset/ODE6KCausal_{v}",
            "batch_size": "1", "log_iters": "1000", "trainer": "ode", "gradient_checkpointing": "true",
            "num_frame_per_block": str(k), "model_kwargs": "{timestep_shift: 5.0}"}


SELF_FORCING_DMD = {
    **_dmd(3, "chunkwise"), "generator_ckpt": "checkpoints/ode_init.pt", "wandb_host": "WANDB_HOST",
    "wandb_key": "WANDB_KEY", "wandb_entity": "WANDB_ENTITY", "wandb_project": "WANDB_PROJECT",
    "total_batch_size": "64", "log_iters": "50"}
ROLLING_FORCING = {
    **{k: v for k, v in _dmd(3, "chunkwise").items() if k not in WANDB}, "lr": "1.5e-06", "total_batch_size": "64",
    "generator_ckpt": "../checkpoints/chunkwise/causal_ode.pt", "log_iters": "1000",
    "data_path": "../prompts/vidprom_filtered_extended.txt"}
PUBLISHED = {
    "ar_diffusion_tf_framewise": _ar(1), "ar_diffusion_tf_chunkwise": _ar(3),
    "causal_ode_framewise": _ode(1, "framewise"), "causal_ode_chunkwise": _ode(3, "chunkwise"),
    "causal_cd_framewise": _cd(1, "framewise"), "causal_cd_chunkwise": _cd(3, "chunkwise"),
    "causal_forcing_dmd_framewise": _dmd(1, "framewise"), "causal_forcing_dmd_chunkwise": _dmd(3, "chunkwise"),
    "causal_forcing_dmd_framewise_1step": _dmd(1, "framewise", "[1000]", FOUR),
    "causal_forcing_dmd_framewise_2step": _dmd(1, "framewise", "[1000, 500]", FOUR),
    "self_forcing_dmd": SELF_FORCING_DMD,
}
SECRET_VALUES = ("your key", "api.wandb.ai", "WANDB_KEY", "WANDB_HOST")


def _text(keys: dict) -> str:
    return "".join(f"{key}: {value}\n" for key, value in keys.items())


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """The published configs/ folder: every stage YAML beside the published default_config.yaml."""
    folder = tmp_path_factory.mktemp("published") / "configs"
    folder.mkdir()
    (folder / "default_config.yaml").write_text(_text(DEFAULTS), encoding="utf-8")
    for name, keys in PUBLISHED.items():
        (folder / f"{name}.yaml").write_text(_text(keys), encoding="utf-8")
    return folder


def _warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_yaml_loads_with_its_published_values(published, name, caplog):
    keys = PUBLISHED[name]
    with caplog.at_level(logging.WARNING):
        cfg = load_config(published / f"{name}.yaml")
    expected = {key: yaml.safe_load(value) for key, value in keys.items()
                if key not in COMPAT_KEYS and key not in WANDB and key not in ("model_kwargs", "total_batch_size",
                                                                               "wandb_name", "negative_prompt")}
    for key, want in expected.items():
        assert getattr(cfg, key) == want, key
    assert cfg.negative_prompt == WAN_NEGATIVE_PROMPT and cfg.timestep_shift == 5.0
    assert (cfg.height, cfg.width, cfg.num_frames, cfg.num_training_frames) == (480, 832, 81, 21)
    # the published meanings: total_batch_size and wandb_name are not read; placeholders are unset, so W&B stays off
    assert cfg.total_batch_size is None and cfg.wandb_name is None
    assert grad_accum_steps(cfg, world_size=1) == grad_accum_steps(cfg, world_size=64) == 1
    assert (cfg.wandb_entity, cfg.wandb_project, cfg.wandb_mode) == (None, "causal-forcing", "disabled")
    warnings = _warnings(caplog)
    stage = [w for w in warnings if w.startswith(str(published / name))]
    assert len(stage) == 3, stage   # secrets, placeholders, keys not read
    secrets, placeholders, unread = stage
    assert "export WANDB_API_KEY / WANDB_BASE_URL" in secrets
    assert "wandb_entity" in placeholders and "wandb_project" in placeholders
    assert all(k in unread for k in keys if k in COMPAT_KEYS or k in ("total_batch_size", "wandb_name"))
    if "total_batch_size" in keys:
        assert "no gradient accumulation" in unread
    for value in SECRET_VALUES:
        assert all(value not in w for w in warnings)
        assert value not in config_to_yaml(cfg) and value not in str(config_to_dict(cfg))


def test_every_published_yaml_through_the_command_line_printer(published):
    for name in PUBLISHED:
        run = subprocess.run([sys.executable, "-m", "app.config", str(published / f"{name}.yaml")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (name, run.stderr)
        printed = yaml.safe_load(run.stdout)
        assert printed["trainer"] == yaml.safe_load(PUBLISHED[name]["trainer"]) and printed["total_batch_size"] is None
        assert "height 480, width 832, num_frames 81" in run.stdout
        assert not any(value in run.stdout + run.stderr for value in SECRET_VALUES), name


def test_every_published_yaml_gets_past_train_py_config_loading(published, capsys):
    for name in PUBLISHED:
        args = train.parse_args(["--config_path", str(published / f"{name}.yaml"), "--no_visualize"])
        cfg = train.load_run_config(args)
        assert cfg.config_name == name and cfg.logdir == ""
        # the real entry point: the config loads and the stage's objective builds; the run then needs --logdir
        assert train.main(["--config_path", str(published / f"{name}.yaml")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: logdir is empty") and err.count("\n") == 1, (name, err)


def test_every_published_yaml_gets_past_inference_py_config_loading(published):
    for name in PUBLISHED:
        args = inference.parse_args(["--config_path", str(published / f"{name}.yaml"), "--data_path", "p.txt",
                                     "--output_folder", "out", "--local_attn_size", "6"])
        cfg = config_from_args(args)
        assert cfg.model_kwargs.local_attn_size == 6 and cfg.image_or_video_shape == [1, 21, 16, 60, 104]


def test_published_dmd_yaml_generates_a_video(published, tmp_path):
    """inference.py end to end on a published stage-3 YAML, pointed at a tiny model folder by overrides."""
    tiny = write_tiny_stream_config(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    overrides = [f"wan_models_dir={tiny.parent}", "generator_name=Tiny", "text_encoder_name=Tiny",
                 "generator_ckpt=null", "image_or_video_shape=[1,6,16,4,6]", "num_training_frames=6"]
    for name in ("causal_forcing_dmd_chunkwise", "self_forcing_dmd"):
        out = tmp_path / name
        code = inference.main(["--config_path", str(published / f"{name}.yaml"), "--data_path",
                               str(tmp_path / "prompts.txt"), "--output_folder", str(out), "--device", "cpu",
                               "--no_compile", "--override", *overrides])
        assert code == 0 and [p.name for p in out.glob("*.mp4")] == ["a red circle.mp4"]


def test_train_py_process_prints_one_line_and_no_secret(published, repo_root, tmp_path):
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text((published / "causal_ode_framewise.yaml").read_text().replace(
        "{your key}", "sk-abc-SECRET-123"), encoding="utf-8")
    run = subprocess.run([sys.executable, "train.py", "--config_path", str(yaml_path)], cwd=repo_root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.count("error: ") == 1 and "logdir is empty" in run.stderr
    assert "SECRET" not in run.stdout + run.stderr and "WANDB_API_KEY" in run.stderr  # the warning says what to do


def test_secret_values_never_reach_logs_output_or_the_saved_config(tmp_path, caplog, capsys):
    path = tmp_path / "x.yaml"
    path.write_text("trainer: ode\nwandb_key: sk-abc-SECRET-123\nwandb_host: https://SECRET-HOST.example\n")
    with caplog.at_level(logging.DEBUG):
        cfg = load_config(path, ["wandb_key=SECRET-FROM-OVERRIDE", "lr=1e-5"])
    logged = " ".join(_warnings(caplog))
    assert len(_warnings(caplog)) == 2   # the file's one warning and the override's one
    assert "ignoring wandb_key, wandb_host" in logged and "export WANDB_API_KEY / WANDB_BASE_URL" in logged
    assert "wandb_key=..." in logged   # the override is named without its value
    for text in (logged, config_to_yaml(cfg), str(config_to_dict(cfg))):
        assert "SECRET" not in text
    assert cfg.lr == 1e-5
    with pytest.raises(ConfigError) as error:   # a later error names the override, never the secret
        load_config(path, ["wandb_key=SECRET[", "lr=abc"])
    assert "SECRET" not in str(error.value)


@pytest.mark.parametrize("value", ["{your entity}", "WANDB_ENTITY"])
def test_placeholders_count_as_unset_with_a_warning(tmp_path, caplog, value):
    path = tmp_path / "x.yaml"
    path.write_text(f"trainer: ode\nwandb_entity: {value}\ndata_path: {{your data}}\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert cfg.wandb_entity is None and cfg.data_path is None
    assert _warnings(caplog) == [f"{path}: wandb_entity, data_path hold placeholders, treated as unset"]


def test_rolling_forcing_yaml_loads_as_rolling_forcing(tmp_path, repo_root):
    """The published long_video YAML means Rolling Forcing (the fork has no key for it), beside the fork's
    default_config.yaml or alone; our rolling_forcing key says it explicitly."""
    folder = tmp_path / "long_video" / "configs"
    folder.mkdir(parents=True)
    (folder / "default_config.yaml").write_text(_text({**DEFAULTS, "num_training_frames": "27"}))
    rolling = folder / "rolling_forcing_dmd.yaml"
    rolling.write_text(_text(ROLLING_FORCING), encoding="utf-8")
    cfg = load_config(rolling)
    assert cfg.rolling_forcing and cfg.num_training_frames == 27 and cfg.lr == 1.5e-6
    assert (cfg.rolling_span, cfg.rolling_sink, cfg.num_frame_per_block) == (21, 3, 3)
    alone = tmp_path / "configs" / "rolling_forcing_dmd.yaml"      # copied without the fork's default_config
    alone.parent.mkdir()
    alone.write_text(rolling.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = load_config(alone)
    assert cfg.rolling_forcing and cfg.num_training_frames == 27
    assert load_config(alone, ["num_training_frames=24"]).num_training_frames == 24
    assert not load_config(alone, ["rolling_forcing=false", "num_training_frames=21"]).rolling_forcing
    run = subprocess.run([sys.executable, "-m", "app.config", str(rolling)], cwd=repo_root, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "rolling_forcing: true" in run.stdout
    # renamed, it is plain DMD, and its long_video rollout length asks for the key
    renamed = folder / "long.yaml"
    renamed.write_text(rolling.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"long\.yaml: num_training_frames must be <= image_or_video_shape\[1\] "
                                          r"\(21\) unless rolling_forcing: true, got 27"):
        load_config(renamed)
    assert load_config(renamed, ["rolling_forcing=true"]).rolling_forcing


def test_total_batch_size_keeps_our_meaning_outside_published_files(published, tmp_path):
    # a YAML of ours on top of a published one: accumulation to total_batch_size
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"base: {published / 'causal_cd_framewise.yaml'}\ntotal_batch_size: 16\n")
    cfg = load_config(mine)
    assert cfg.total_batch_size == 16 and grad_accum_steps(cfg, world_size=2) == 8
    # an override on a published file is ours too
    cfg = load_config(published / "causal_cd_framewise.yaml", ["total_batch_size=16"])
    assert grad_accum_steps(cfg, world_size=4) == 4
    # a file that carries one of our keys is ours, even with published-only keys in it
    ours = tmp_path / "ours.yaml"
    ours.write_text("trainer: ode\ndistribution_loss: dmd\ntotal_batch_size: 8\nmax_steps: 10\nwandb_name: run\n")
    cfg = load_config(ours)
    assert (cfg.total_batch_size, cfg.wandb_name, grad_accum_steps(cfg, world_size=1)) == (8, "run", 8)


def test_published_wandb_target_turns_wandb_on(published, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text((published / "causal_ode_chunkwise.yaml").read_text().replace("{your project}", "my-project"))
    cfg = load_config(path)
    assert (cfg.wandb_project, cfg.wandb_mode, cfg.wandb_name) == ("my-project", "online", None)
    cfg = load_config(path, ["wandb_mode=disabled"])
    assert cfg.wandb_mode == "disabled"
    ours = tmp_path / "ours.yaml"
    ours.write_text("trainer: ode\nwandb_project: my-project\n")
    assert load_config(ours).wandb_mode == "disabled"


@pytest.mark.parametrize("line, message", [
    ("distribution_loss: sid", r"distribution_loss: 'sid' is not supported \(DMD is the only distribution loss\); "
                               r"accepted: 'dmd'$"),
    ("generator_fsdp_wrap_strategy: nope", r"generator_fsdp_wrap_strategy: 'nope' is not supported"),
    ("load_raw_video: true", r"load_raw_video: True is not supported \(training reads latents"),
    ("i2v: true", r"i2v: True is not supported \(image-conditioned training is not implemented"),
    ("is_causal: false", r"is_causal: False is not supported"),
])
def test_compatibility_value_we_cannot_honour_fails_in_one_line(tmp_path, line, message):
    path = tmp_path / "x.yaml"
    path.write_text(f"trainer: consistency_distillation\n{line}\n")
    with pytest.raises(ConfigError, match=rf"x\.yaml: {message}"):
        load_config(path)
