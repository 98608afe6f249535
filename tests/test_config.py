"""utils/config.py: shipped YAMLs load with the reference's values; bad keys, types and values fail with one line."""

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from app.config import describe_defaults, main
from utils.config import Config, config_to_dict, config_to_yaml, grad_accum_steps, load_config
from utils.config_compat import COMPAT_KEYS, SECRET_KEYS
from utils.errors import ConfigError

STAGE_CONFIGS = [
    "ar_diffusion_tf_framewise", "ar_diffusion_tf_chunkwise",
    "causal_ode_framewise", "causal_ode_chunkwise",
    "causal_cd_framewise", "causal_cd_chunkwise",
    "causal_forcing_dmd_framewise", "causal_forcing_dmd_chunkwise",
    "causal_forcing_dmd_framewise_1step", "causal_forcing_dmd_framewise_2step",
    "rolling_forcing_dmd",
]

# Values every shipped reference config resolves to (training.md §3-§6 and §9.1; model_and_inference.md §1).
COMMON = {
    "lr": 2.0e-6, "beta2": 0.999, "weight_decay": 0.01, "batch_size": 1, "guidance_scale": 3.0,
    "timestep_shift": 5.0, "num_train_timestep": 1000,
    "image_or_video_shape": [1, 21, 16, 60, 104], "mixed_precision": True, "gradient_checkpointing": True,
    "sharding_strategy": "hybrid_full", "height": 480, "width": 832, "num_frames": 81, "fps": 16,
}
FOUR_STEP = [1000, 750, 500, 250]
AR = {"trainer": "diffusion", "data_path": "dataset/clean_data", "teacher_forcing": True, "beta1": 0.0,
      "log_iters": 1000, "generator_ckpt": None, "denoising_step_list": None}
ODE = {"trainer": "ode", "beta1": 0.9, "log_iters": 1000, "denoising_step_list": FOUR_STEP,
       "warp_denoising_step": True}
CD = {"trainer": "consistency_distillation", "data_path": "dataset/clean_data", "beta1": 0.0, "log_iters": 1000,
      "discrete_cd_N": 48, "ema_weight": 0.99, "ema_start_step": 200, "denoising_step_list": FOUR_STEP,
      "warp_denoising_step": True}
DMD = {"trainer": "score_distillation", "data_path": "prompts/vidprom_filtered_extended.txt",
       "real_name": "Wan2.1-T2V-14B", "fake_name": "Wan2.1-T2V-1.3B", "lr_critic": 4.0e-7, "beta1": 0.0,
       "beta1_critic": 0.0, "beta2_critic": 0.999, "dfake_gen_update_ratio": 5, "log_iters": 250,
       "ema_weight": 0.99, "ema_start_step": 200, "denoising_step_list": FOUR_STEP, "warp_denoising_step": True,
       "denoising_loss_type": "flow", "ts_schedule": False, "num_training_frames": 21,
       "same_step_across_blocks": True, "context_noise": 0, "real_guidance_scale": 3.0, "fake_guidance_scale": 0.0,
       "denoising_step_list_first_chunk": None}
EXPECTED = {
    "ar_diffusion_tf_framewise": {**AR, "num_frame_per_block": 1},
    "ar_diffusion_tf_chunkwise": {**AR, "num_frame_per_block": 3},
    "causal_ode_framewise": {**ODE, "num_frame_per_block": 1, "data_path": "dataset/ODE6KCausal_framewise",
                             "generator_ckpt": "checkpoints/framewise/ar_diffusion.pt"},
    "causal_ode_chunkwise": {**ODE, "num_frame_per_block": 3, "data_path": "dataset/ODE6KCausal_chunkwise",
                             "generator_ckpt": "checkpoints/chunkwise/ar_diffusion.pt"},
    "causal_cd_framewise": {**CD, "num_frame_per_block": 1, "generator_ckpt": "checkpoints/framewise/ar_diffusion.pt"},
    "causal_cd_chunkwise": {**CD, "num_frame_per_block": 3, "generator_ckpt": "checkpoints/chunkwise/ar_diffusion.pt"},
    "causal_forcing_dmd_framewise": {**DMD, "num_frame_per_block": 1,
                                     "generator_ckpt": "checkpoints/framewise/causal_ode.pt"},
    "causal_forcing_dmd_chunkwise": {**DMD, "num_frame_per_block": 3,
                                     "generator_ckpt": "checkpoints/chunkwise/causal_ode.pt"},
    "causal_forcing_dmd_framewise_1step": {**DMD, "num_frame_per_block": 1, "denoising_step_list": [1000],
                                           "denoising_step_list_first_chunk": FOUR_STEP,
                                           "generator_ckpt": "checkpoints/framewise/causal_ode.pt"},
    "causal_forcing_dmd_framewise_2step": {**DMD, "num_frame_per_block": 1, "denoising_step_list": [1000, 500],
                                           "denoising_step_list_first_chunk": FOUR_STEP,
                                           "generator_ckpt": "checkpoints/framewise/causal_ode.pt"},
    # long_video/configs/rolling_forcing_dmd.yaml, with the fork's default_config (num_training_frames: 27)
    "rolling_forcing_dmd": {**DMD, "num_frame_per_block": 3, "generator_ckpt": "checkpoints/chunkwise/causal_ode.pt",
                            "rolling_forcing": True, "num_training_frames": 27, "lr": 1.5e-6, "log_iters": 1000,
                            "max_steps": 3000},
}


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_configs_are_exactly_the_stage_list(configs_dir):
    shipped = sorted(p.stem for p in configs_dir.glob("*.yaml") if p.name != "default_config.yaml")
    assert shipped == sorted(STAGE_CONFIGS)


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_shipped_config_has_reference_values(configs_dir, name):
    cfg = load_config(configs_dir / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.config_name == name
    for key, want in {**COMMON, **EXPECTED[name]}.items():
        assert _get(cfg, key) == want, key
    # plain Python containers, not OmegaConf nodes: torch.tensor(cfg.denoising_step_list) must work
    assert type(cfg.image_or_video_shape) is list
    assert f"lr: {cfg.lr:.1e}" in OmegaConf.to_yaml(cfg)


@pytest.mark.parametrize("stage", ["ar_diffusion_tf", "causal_ode", "causal_cd", "causal_forcing_dmd"])
def test_chunkwise_differs_from_framewise_only_in_block_size_and_paths(configs_dir, stage):
    frame = config_to_dict(load_config(configs_dir / f"{stage}_framewise.yaml"))
    chunk = config_to_dict(load_config(configs_dir / f"{stage}_chunkwise.yaml"))
    differing = {k for k in frame if frame[k] != chunk[k]}
    assert differing <= {"num_frame_per_block", "generator_ckpt", "data_path", "config_name"}
    assert (frame["num_frame_per_block"], chunk["num_frame_per_block"]) == (1, 3)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = _write(tmp_path, "x.yaml", "trainer: ode\nlerning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown key 'lerning_rate' \(did you mean 'lr'\?\)$"):
        load_config(path)


def test_unknown_nested_key_and_close_misspelling(tmp_path):
    path = _write(tmp_path, "x.yaml", "trainer: ode\nmodel_kwargs:\n  local_atn_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model_kwargs.local_atn_size' \(did you mean "
                                          r"'model_kwargs.local_attn_size'\?\)"):
        load_config(path)
    path = _write(tmp_path, "y.yaml", "trainer: ode\nnum_frames_per_blok: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean 'num_frame_per_block'\?"):
        load_config(path)


@pytest.mark.parametrize("line, message", [
    ("lr: fast", r"key 'lr' expects a float, got 'fast'"),
    ("num_frame_per_block: 1.5", r"key 'num_frame_per_block' expects an int, got 1.5"),
    ("denoising_step_list: [1000, abc]", r"key 'denoising_step_list\[1\]' expects a list of ints or null"),
    ("teacher_forcing: maybe", r"key 'teacher_forcing' expects a boolean, got 'maybe'"),
    ("wandb_entity: {a: 1}", r"key 'wandb_entity' expects a string or null"),
])
def test_mistyped_value_fails_naming_key(tmp_path, line, message):
    path = _write(tmp_path, "x.yaml", f"trainer: ode\n{line}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: " + message):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("trainer=gan", "trainer must be one of diffusion, ode"),
    ("num_frame_per_block=0", "num_frame_per_block must be >= 1"),
    ("denoising_step_list=[1000,750,0]", r"values must lie in \(0, 1000\]"),
    ("denoising_step_list=[250,500]", "strictly descending"),
    ("denoising_step_list=[]", "must not be empty"),
    ("guidance_scale=-1", "guidance_scale must be >= 0"),
    ("model_kwargs.local_attn_size=2", r"local_attn_size must be -1 or >= num_frame_per_block \(3\)"),
    ("wandb_mode=on", "wandb_mode must be one of disabled, offline, online"),
    ("ema_weight=1.0", r"ema_weight must lie in \[0, 1\)"),
    ("num_training_frames=20", "num_training_frames must split into blocks of num_frame_per_block=3"),
    ("total_batch_size=0", "total_batch_size must be a positive multiple"),
    ("lr=.inf", "lr must be a finite number > 0, got inf"),
    ("lr=.nan", "lr must be a finite number > 0, got nan"),
    ("lr_critic=0", "lr_critic must be a finite number > 0, got 0"),
    ("weight_decay=.inf", "weight_decay must be a finite number >= 0"),
    ("seed=-1", r"seed must lie in \[0, 2\^63\), got -1"),
    (f"seed={2**63}", r"seed must lie in \[0, 2\^63\)"),
])
def test_invalid_value_fails(configs_dir, override, message):
    with pytest.raises(ConfigError, match=r"causal_forcing_dmd_chunkwise\.yaml: .*" + message):
        load_config(configs_dir / "causal_forcing_dmd_chunkwise.yaml", [override])


def test_direct_construction_is_validated_and_resolves_fallbacks():
    with pytest.raises(ConfigError, match="num_frame_per_block must be >= 1, got 0"):
        Config(trainer="ode", num_frame_per_block=0)
    cfg = Config(trainer="score_distillation", lr=1e-5, guidance_scale=4.0)
    assert (cfg.lr_critic, cfg.real_guidance_scale, cfg.fake_guidance_scale) == (1e-5, 4.0, 0.0)


def test_missing_trainer_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"x\.yaml: missing required key 'trainer'"):
        load_config(_write(tmp_path, "x.yaml", "lr: 1.0e-5\n"))
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: cannot parse YAML"):
        load_config(_write(tmp_path, "bad.yaml", "trainer: [ode\n"))
    with pytest.raises(ConfigError, match=r"dup\.yaml: cannot parse YAML: found duplicate key trainer \(line 2\)"):
        load_config(_write(tmp_path, "dup.yaml", "trainer: ode\ntrainer: ode\n"))


def test_legacy_keys_load_with_one_warning(tmp_path, caplog):
    # a reference-style stage YAML (training.md §9.1), minus the secrets: read as published (no base, only
    # published keys), so its wandb_name keeps the published meaning too (not read)
    text = ("trainer: ode\ngenerator_grad:\n  model: true\ngenerator_task: causal_video\nspatial_sf: true\n"
            "grad_accum: 1\ndiscriminator_lr_multiplier: 1.0\nckpt_step: 0\nprompt_name: MovieGenVideoBench\n"
            "num_samples: 1\nwandb_name: ode\nno_visualize: true\nmodel_kwargs:\n  timestep_shift: 5.0\n")
    with caplog.at_level(logging.WARNING, logger="utils"):
        cfg = load_config(_write(tmp_path, "old.yaml", text))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for key in ("generator_grad", "generator_task", "spatial_sf", "grad_accum", "ckpt_step", "num_samples",
                "wandb_name"):
        assert key in warnings[0]
        assert not hasattr(cfg, key) or key == "wandb_name"
    assert cfg.wandb_name is None
    assert cfg.no_visualize and "no_visualize" not in warnings[0]   # read: training writes sample videos unless set
    assert {"tf", "spatial_sf", "distribution_loss"} <= set(COMPAT_KEYS)


@pytest.mark.parametrize("key, env", [("wandb_key", "WANDB_API_KEY"), ("wandb_host", "WANDB_BASE_URL")])
def test_wandb_secrets_in_yaml_are_ignored_pointing_to_environment(tmp_path, key, env, caplog):
    path = _write(tmp_path, "x.yaml", f"trainer: ode\n{key}: abc123\n")
    with caplog.at_level(logging.WARNING, logger="utils"):
        cfg = load_config(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{path}: ignoring {key}: credentials are never read from a YAML; export {env} instead"]
    assert "abc123" not in config_to_yaml(cfg) and SECRET_KEYS[key] == env


def test_environment_interpolation_is_refused(tmp_path, monkeypatch):
    """``${oc.env:...}`` would resolve a secret into every checkpoint's config.yaml and the W&B config: refused in a
    YAML (at any depth) and in an override, naming the key and never the value."""
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-value")
    for text, key in (("wandb_name: ${oc.env:WANDB_API_KEY}\n", "wandb_name"),
                      ("config_name: run-${oc.env:WANDB_API_KEY,none}\n", "config_name"),
                      ("model_kwargs:\n  local_attn_size: ${oc.decode:${oc.env:WINDOW}}\n",
                       "model_kwargs.local_attn_size")):
        path = _write(tmp_path, "x.yaml", "trainer: ode\n" + text)
        with pytest.raises(ConfigError, match=rf"x\.yaml: {re.escape(key)} reads an environment variable") as err:
            load_config(path)
        assert "s3cr3t" not in str(err.value)
    path = _write(tmp_path, "y.yaml", "trainer: ode\n")
    with pytest.raises(ConfigError, match=r"override 'wandb_project=\$\{oc.env:WANDB_API_KEY\}': wandb_project reads"):
        load_config(path, ["wandb_project=${oc.env:WANDB_API_KEY}"])
    assert load_config(path, ["wandb_name=plain-$HOME-text"]).wandb_name == "plain-$HOME-text"


def test_overrides(configs_dir):
    path = configs_dir / "causal_forcing_dmd_framewise.yaml"
    cfg = load_config(path, ["lr=1e-5", "denoising_step_list=[1000,500]", "model_kwargs.local_attn_size=6",
                             "generator_ckpt=null", "seed=7"])
    assert (cfg.lr, cfg.denoising_step_list, cfg.model_kwargs.local_attn_size) == (1e-5, [1000, 500], 6)
    assert cfg.generator_ckpt is None and cfg.seed == 7
    assert cfg.lr_critic == 4.0e-7  # set by the YAML, so not the lr fallback
    with pytest.raises(ConfigError, match=r"override 'lerning_rate=1': unknown key 'lerning_rate' \(did you mean"):
        load_config(path, ["lerning_rate=1"])
    with pytest.raises(ConfigError, match=r"override 'lr': expected key=value"):
        load_config(path, ["lr"])
    with pytest.raises(ConfigError, match=r"override 'lr=abc': key 'lr' expects a float"):
        load_config(path, ["lr=abc"])
    with pytest.raises(ConfigError, match=r"override 'denoising_step_list=\[1000,': cannot parse"):
        load_config(path, ["denoising_step_list=[1000,"])


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "a.yaml", "trainer: ode\nlr: 1.0e-5\nseed: 3\n")
    _write(tmp_path / "sub", "b.yaml", "base: ../a.yaml\nseed: 4\n")
    cfg = load_config(_write(tmp_path, "c.yaml", "base: sub/b.yaml\nnum_frame_per_block: 3\n"))
    assert (cfg.trainer, cfg.lr, cfg.seed, cfg.num_frame_per_block, cfg.config_name) == ("ode", 1e-5, 4, 3, "c")
    _write(tmp_path, "loop1.yaml", "base: loop2.yaml\n")
    _write(tmp_path, "loop2.yaml", "base: loop1.yaml\n")
    with pytest.raises(ConfigError, match="chain loops back"):
        load_config(tmp_path / "loop1.yaml")
    with pytest.raises(ConfigError, match=r"d\.yaml: base config .*missing\.yaml not found"):
        load_config(_write(tmp_path, "d.yaml", "base: missing.yaml\n"))
    with pytest.raises(ConfigError, match=r"a\.yaml: unknown key 'lrr'"):  # errors name the file that has the key
        _write(tmp_path, "a.yaml", "trainer: ode\nlrr: 1.0\n")
        load_config(tmp_path / "c.yaml")


def test_default_config_beside_the_file_is_merged_under_it(tmp_path):
    _write(tmp_path, "default_config.yaml", "seed: 5\nlr: 3.0e-6\n")
    cfg = load_config(_write(tmp_path, "x.yaml", "trainer: ode\nlr: 1.0e-5\n"))
    assert (cfg.seed, cfg.lr) == (5, 1e-5)


def test_defaults_live_only_in_the_schema(configs_dir, tmp_path):
    # the shipped default_config.yaml holds no values, so the dataclass is the single copy of every default
    assert OmegaConf.to_container(OmegaConf.load(configs_dir / "default_config.yaml")) == {}
    # a YAML naming only the trainer (merged over the repository's default_config.yaml) gives the dataclass defaults
    cfg = load_config(_write(tmp_path, "bare.yaml", "trainer: ode\n"))
    assert cfg == Config(trainer="ode", config_name="bare")
    # the documented dump (`python -m app.config`) shows the same defaults, before the null fallbacks resolve
    expected = {**config_to_dict(cfg), "trainer": "???", "config_name": "", "lr_critic": None,
                "real_guidance_scale": None, "fake_guidance_scale": None, "num_training_frames": None}
    assert yaml.safe_load(describe_defaults()) == expected


def test_every_field_has_a_doc():
    def fields(schema):
        for f in dataclasses.fields(schema):
            yield f
            if dataclasses.is_dataclass(f.type):
                yield from fields(f.type)
    assert all(f.metadata.get("doc") for f in fields(Config))


def test_serialisation(configs_dir):
    cfg = load_config(configs_dir / "causal_cd_chunkwise.yaml")
    as_dict = config_to_dict(cfg)
    json.dumps(as_dict)  # plain types only
    assert as_dict["model_kwargs"] == {"local_attn_size": -1, "sink_size": 0}
    assert yaml.safe_load(config_to_yaml(cfg)) == as_dict


def test_grad_accum_steps():
    cfg = Config(trainer="ode", batch_size=2, total_batch_size=16)
    assert grad_accum_steps(cfg, world_size=2) == 4
    assert grad_accum_steps(Config(trainer="ode"), world_size=64) == 1
    with pytest.raises(ConfigError, match="total_batch_size 16 is not a multiple of batch_size x world size"):
        grad_accum_steps(cfg, world_size=3)


def test_command_line(configs_dir, capsys):
    assert main([str(configs_dir / "causal_ode_chunkwise.yaml"), "seed=9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["seed"], printed["num_frame_per_block"]) == (9, 3)
    assert main([str(configs_dir / "causal_ode_chunkwise.yaml"), "sed=9"]) == 2
    assert "unknown key 'sed'" in capsys.readouterr().err


def test_pixel_geometry_derives_from_the_latent_shape_and_copies_are_checked(tmp_path):
    cfg = load_config(_write(tmp_path, "a.yaml", "trainer: ode\nimage_or_video_shape: [1, 9, 16, 8, 12]\n"))
    assert (cfg.height, cfg.width, cfg.num_frames, cfg.num_training_frames) == (64, 96, 33, 9)
    # copies that agree load; one that disagrees fails naming the file, the key and the derived value
    agree = "trainer: ode\nimage_or_video_shape: [1, 9, 16, 8, 12]\nheight: 64\nwidth: 96\nnum_frames: 33\n"
    assert load_config(_write(tmp_path, "b.yaml", agree)).height == 64
    with pytest.raises(ConfigError, match=r"c\.yaml: width 832 does not match image_or_video_shape \(which gives "
                                          r"96\); drop width \(it is derived from image_or_video_shape\)"):
        load_config(_write(tmp_path, "c.yaml", "trainer: ode\nimage_or_video_shape: [1, 9, 16, 8, 12]\nwidth: 832\n"))
    with pytest.raises(ConfigError, match=r"d\.yaml: num_frames 81 does not match image_or_video_shape"):
        load_config(_write(tmp_path, "d.yaml", "trainer: ode\nimage_or_video_shape: [1, 9, 16, 8, 12]\n"
                                               "num_frames: 81\n"))
    # a later layer that sets the source supersedes an earlier copy (e.g. a site default_config.yaml)
    _write(tmp_path, "base.yaml", "trainer: ode\nheight: 480\n")
    cfg = load_config(_write(tmp_path, "e.yaml", "base: base.yaml\nimage_or_video_shape: [1, 9, 16, 8, 12]\n"))
    assert cfg.height == 64
    with pytest.raises(ConfigError, match=r"override 'height=480': height 480 does not match"):
        load_config(tmp_path / "e.yaml", ["height=480"])


def test_one_timestep_shift_with_a_checked_copy(tmp_path):
    cfg = load_config(_write(tmp_path, "a.yaml", "trainer: ode\ntimestep_shift: 3.0\n"
                                                 "model_kwargs:\n  timestep_shift: 3.0\n"))
    assert cfg.timestep_shift == 3.0 and not hasattr(cfg.model_kwargs, "timestep_shift")
    with pytest.raises(ConfigError, match=r"b\.yaml: model_kwargs\.timestep_shift 3\.0 does not match timestep_shift "
                                          r"\(which gives 5\.0\)"):
        load_config(_write(tmp_path, "b.yaml", "trainer: ode\nmodel_kwargs:\n  timestep_shift: 3.0\n"))
    # an override of the one shift supersedes the file's copy; the grid and the samplers read it
    assert load_config(tmp_path / "a.yaml", ["timestep_shift=2"]).timestep_shift == 2.0
    from model.scheduler import FlowMatchScheduler
    from pipeline.components import build_scheduler

    ours = build_scheduler(load_config(tmp_path / "a.yaml")).timesteps
    assert torch.equal(ours, FlowMatchScheduler(num_train_timesteps=1000, shift=3.0).timesteps)
    assert not torch.equal(ours, FlowMatchScheduler(num_train_timesteps=1000, shift=5.0).timesteps)


@pytest.mark.parametrize("overrides, message", [
    (["num_training_frames=24"], r"num_training_frames must be <= image_or_video_shape\[1\] \(21\) unless "
                                 r"rolling_forcing: true"),
    (["causal=false"], "causal: false .* needs trainer: diffusion"),
    (["rolling_forcing=true", "model_kwargs.local_attn_size=12"],
     r"rolling_forcing: the attention span .* must hold the 3 sink frames and a window of .* = 12 frames, got 12"),
    (["rolling_forcing=true", "denoising_step_list_first_chunk=[1000]"], "rolling_forcing denoises every block"),
])
def test_values_we_cannot_honour_fail(configs_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(configs_dir / "causal_forcing_dmd_chunkwise.yaml", overrides)


def test_shipped_yamls_use_only_schema_keys(repo_root):
    """Our YAMLs carry no compatibility or secret key, so none is read as a published YAML."""
    for path in sorted((repo_root / "configs").rglob("*.yaml")):
        keys = set(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        assert not keys & (set(COMPAT_KEYS) | set(SECRET_KEYS) | {"height", "width", "num_frames"}), path


def test_every_schema_key_is_read_by_some_code(repo_root):
    """Issue 21: every schema key is read outside the config modules (else it belongs in COMPAT_KEYS)."""
    config_modules = {repo_root / "utils" / "config.py", repo_root / "utils" / "config_compat.py",
                      repo_root / "app" / "config.py"}
    text = "\n".join(p.read_text(encoding="utf-8") for p in repo_root.rglob("*.py")
                     if "tests" not in p.relative_to(repo_root).parts and p not in config_modules)
    read_in_config = {"total_batch_size"}   # by grad_accum_steps, the one place trainer/loop.py asks

    def fields(schema):
        for f in dataclasses.fields(schema):
            yield f.name
            if dataclasses.is_dataclass(f.type):
                yield from fields(f.type)
    unread = [name for name in fields(Config) if f".{name}" not in text and name not in read_in_config]
    assert unread == []


def test_build_vae_checks_the_strides_and_channels_the_geometry_assumes(tmp_path):
    from pipeline.components import build_vae
    from toy.folders import TINY_VAE, write_tiny_wan_folder

    write_tiny_wan_folder(tmp_path / "Tiny")
    write_tiny_wan_folder(tmp_path / "Half", vae={**TINY_VAE, "dim_mult": [1, 2, 4]})   # 4x spatial
    path = _write(tmp_path, "x.yaml", f"trainer: ode\nwan_models_dir: {tmp_path}\ntext_encoder_name: Tiny\n"
                                      "image_or_video_shape: [1, 2, 16, 4, 6]\n")
    assert build_vae(load_config(path)).latent_channels == 16
    with pytest.raises(ConfigError, match=r"VAE .*Tiny/vae: temporal/spatial stride and latent channels \(4, 8, 16\) "
                                          r"differ from the config's \(4, 8, 8\)"):
        build_vae(load_config(path, ["image_or_video_shape=[1,2,8,4,6]"]))
    with pytest.raises(ConfigError, match=r"\(4, 4, 16\) differ"):
        build_vae(load_config(path, ["text_encoder_name=Half"]))
