"""model/loader.py: every weights format round-trips to identical tensors, errors are one clear line, and
build_wan_model (meta-device path) equals a directly constructed model loaded with the same weights."""

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from model.config import WanConfig, get_preset  # noqa: E402
from model.loader import (  # noqa: E402
    build_wan_model,
    convert_diffusers_to_original,
    convert_original_to_diffusers,
    load_strict,
    normalize_keys,
    read_model_config,
    read_state_dict,
    save_release_checkpoint,
)
from model.wan import WanModel  # noqa: E402
from utils.errors import CheckpointError, ConfigError  # noqa: E402

CFG = get_preset("tiny")


def random_sd(seed: int) -> dict:
    """Original-named weights in which every tensor is random (so a mix-up of any two keys shows)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in WanModel(CFG).state_dict().items()}


@pytest.fixture(scope="module")
def sd():
    return random_sd(0)


@pytest.fixture(scope="module")
def ema_sd():
    return random_sd(1)


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def write_wan_folder(folder, sd, sharded: bool):
    """An original Wan2.1 folder: config.json plus one safetensors file, or an index and two shards (the 14B form)."""
    os.makedirs(folder, exist_ok=True)
    CFG.to_json(os.path.join(folder, "config.json"))
    tensors = {k: v.clone() for k, v in sd.items()}
    if not sharded:
        save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        return folder
    keys = sorted(tensors)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: tensors[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# key mapping


def test_mapping_is_lossless_and_agrees_with_diffusers_converter(sd):
    converted = convert_original_to_diffusers(sd)
    assert "blocks.0.norm2.weight" in converted and "blocks.0.norm3.weight" not in converted  # the swap
    assert_same(convert_diffusers_to_original(converted), sd)
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    theirs = single_file_utils.convert_wan_transformer_to_diffusers(dict(sd))
    assert sorted(theirs) == sorted(converted)
    # image-conditioned extras map too, both ways, the way diffusers maps them
    extras = {k: torch.zeros(1) for k in ("img_emb.proj.0.weight", "img_emb.proj.1.bias", "img_emb.proj.3.weight",
                                          "img_emb.proj.4.bias", "blocks.3.cross_attn.k_img.weight",
                                          "blocks.3.cross_attn.v_img.bias", "blocks.3.cross_attn.norm_k_img.weight")}
    assert sorted(convert_original_to_diffusers(extras)) == sorted(
        single_file_utils.convert_wan_transformer_to_diffusers(dict(extras)))
    assert sorted(convert_diffusers_to_original(convert_original_to_diffusers(extras))) == sorted(extras)


@pytest.mark.parametrize("prefix", ["model.", "model._fsdp_wrapped_module.", "_orig_mod.", "module.",
                                    "model._checkpoint_wrapped_module._orig_mod.", "module.model."])
def test_normalize_strips_wrapper_prefixes(sd, prefix):
    assert_same(normalize_keys({prefix + k: v for k, v in sd.items()}), sd)
    diffusers_named = convert_original_to_diffusers(sd)
    assert_same(normalize_keys({prefix + k: v for k, v in diffusers_named.items()}), sd)


def test_normalize_rejects_colliding_keys(sd):
    with pytest.raises(CheckpointError, match="both become"):
        normalize_keys({"model.head.head.bias": sd["head.head.bias"], "head.head.bias": sd["head.head.bias"]})


# ---------------------------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("sharded", [False, True])
def test_original_folder(tmp_path, sd, sharded):
    folder = write_wan_folder(tmp_path / "Wan2.1-T2V-tiny", sd, sharded)
    assert_same(read_state_dict(folder), sd)
    assert read_model_config(folder) == CFG


def test_diffusers_folder_and_pipeline_root(tmp_path, sd):
    """A genuine diffusers save (sharded, weights converted by diffusers' own converter) inside a pipeline root."""
    transformers_mod = pytest.importorskip("diffusers.models.transformers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    model = transformers_mod.WanTransformer3DModel(
        patch_size=CFG.patch_size, num_attention_heads=CFG.num_heads, attention_head_dim=CFG.head_dim,
        in_channels=CFG.in_dim, out_channels=CFG.out_dim, text_dim=CFG.text_dim, freq_dim=CFG.freq_dim,
        ffn_dim=CFG.ffn_dim, num_layers=CFG.num_layers, cross_attn_norm=True, eps=CFG.eps)
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(sd)), strict=True)
    root = tmp_path / "pipeline"
    model.save_pretrained(root / "transformer", max_shard_size="40KB")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert len(list((root / "transformer").glob("*.safetensors"))) > 1            # really sharded
    for folder in (root, root / "transformer"):
        assert_same(read_state_dict(folder), sd)
        # diffusers configs do not carry text_len: the Wan default (512) comes back
        assert read_model_config(folder) == WanConfig(**{**CFG.to_dict(), "text_len": 512})


def test_diffusers_config_rejects_image_models(tmp_path):
    cfg = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 4, "attention_head_dim": 16,
           "num_layers": 2, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "in_channels": 36, "out_channels": 16,
           "patch_size": [1, 2, 2], "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
           "image_dim": 1280, "added_kv_proj_dim": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="image_dim"):
        read_model_config(tmp_path)


def test_release_pt_generator_and_ema(tmp_path, sd, ema_sd):
    """Released layout: generator under ``model.``, EMA under the FSDP-internal ``model._fsdp_wrapped_module.``."""
    path = tmp_path / "causal_forcing.pt"
    torch.save({"generator": {"model." + k: v for k, v in sd.items()},
                "generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in ema_sd.items()}}, path)
    assert_same(read_state_dict(path), sd)
    assert_same(read_state_dict(path, use_ema=True), ema_sd)
    assert_same(read_state_dict(path, key="generator_ema"), ema_sd)
    assert not torch.equal(sd["head.head.weight"], ema_sd["head.head.weight"])


@pytest.mark.parametrize("entries,expected", [
    (("generator", "model", "generator_ema"), "generator"),
    (("model", "generator_ema"), "model"),
    (("generator_ema",), "generator_ema"),     # what the published CD / DMD trainers write once their EMA started
    (("generator_ema", "critic"), "generator_ema"),
])
def test_entry_order_of_the_published_trainers(tmp_path, sd, entries, expected, caplog):
    """Without --use_ema: generator, else model, else generator_ema (logged as a warning); keys under the prefixes
    the published trainers write (FSDP and activation-checkpoint wrappers inside the blocks)."""
    def published(values, tag):
        return {f"model._fsdp_wrapped_module.{k.replace('blocks.0.', 'blocks.0._checkpoint_wrapped_module.')}":
                v + tag for k, v in values.items()}
    path = tmp_path / "model.pt"
    torch.save({name: published(sd, i) for i, name in enumerate(entries)}, path)
    with caplog.at_level(logging.INFO, logger="model.loader"):
        got = read_state_dict(path)
    assert_same(got, {k: v + entries.index(expected) for k, v in sd.items()})
    assert repr(expected) in caplog.text
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warned) == (expected == "generator_ema")


@pytest.mark.parametrize("wrap", ["bare", "model"])
def test_pt_bare_and_model_entry(tmp_path, sd, wrap):
    path = tmp_path / "weights.pth"
    prefixed = {"model._fsdp_wrapped_module." + k: v for k, v in sd.items()}
    torch.save(prefixed if wrap == "bare" else {"model": prefixed}, path)
    assert_same(read_state_dict(path), sd)


def test_safetensors_file(tmp_path, sd):
    path = tmp_path / "weights.safetensors"
    save_file({"_orig_mod." + k: v.clone() for k, v in sd.items()}, str(path))
    assert_same(read_state_dict(path), sd)


def test_save_release_checkpoint_round_trip(tmp_path, sd, ema_sd):
    path = tmp_path / "out" / "model.pt"
    save_release_checkpoint(path, {"_orig_mod." + k: v for k, v in sd.items()}, ema_sd)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(raw) == ["generator", "generator_ema"]
    assert all(k.startswith("model.") and not k.startswith("model._orig_mod") for k in raw["generator"])
    assert_same(read_state_dict(path), sd)
    assert_same(read_state_dict(path, use_ema=True), ema_sd)
    assert os.listdir(path.parent) == ["model.pt"]                     # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_missing_entry_is_explained(tmp_path, sd):
    only_gen = tmp_path / "gen.pt"
    torch.save({"generator": sd}, only_gen)
    with pytest.raises(CheckpointError, match=r"no 'generator_ema' entry \(entries: 'generator'\).*without --use_ema"):
        read_state_dict(only_gen, use_ema=True)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.clone() for k, v in sd.items()}, str(bare))
    with pytest.raises(CheckpointError, match="without --use_ema"):
        read_state_dict(bare, use_ema=True)


class NotATensor:
    pass


def test_unsafe_or_foreign_files_are_refused(tmp_path, sd):
    pickled = tmp_path / "pickled.pt"
    torch.save({"generator": sd, "extra": NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match="cannot read"):         # weights_only refuses arbitrary objects
        read_state_dict(pickled)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(junk)


def test_mismatch_gives_one_error_listing_everything(sd):
    bad = dict(sd)
    del bad["blocks.1.ffn.2.bias"]
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    bad["head.head.weight"] = torch.zeros(5, CFG.dim)
    with pytest.raises(CheckpointError) as info:
        load_strict(WanModel(CFG), bad, "bad.pt")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("bad.pt does not fit the model")
    assert "missing keys (1): blocks.1.ffn.2.bias;" in msg
    assert "unexpected keys (1): blocks.0.extra.weight;" in msg
    assert f"head.head.weight: checkpoint (5, {CFG.dim}) vs model (64, {CFG.dim})" in msg
    # long lists are truncated with a count
    with pytest.raises(CheckpointError, match=rf"missing keys \({len(sd) - 1}\): ([^,;]+, ){{8}}\.\.\.$"):
        load_strict(WanModel(CFG), {"patch_embedding.weight": sd["patch_embedding.weight"]}, "checkpoint")


def test_missing_file_names_download_command(tmp_path):
    weights = pytest.importorskip("model.weights")
    if not hasattr(weights, "download_hint_for_checkpoint"):
        pytest.skip("model/weights.py has no download_hint_for_checkpoint")
    path = tmp_path / "checkpoints" / "chunkwise" / "causal_forcing.pt"
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "hf download zhuhz22/Causal-Forcing chunkwise/causal_forcing.pt --local-dir" in msg
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nowhere.pt")


def test_missing_shard_is_named(tmp_path, sd):
    folder = write_wan_folder(tmp_path / "wan", sd, sharded=True)
    os.remove(folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="1 of 2 shards .* missing .*00002-of-00002"):
        read_state_dict(folder)


# ---------------------------------------------------------------------------------------------------------------
# build_wan_model


def direct(sd, **kwargs) -> WanModel:
    model = WanModel(CFG, **kwargs)
    model.load_state_dict(sd, strict=True)
    return model


@torch.no_grad()
def assert_same_model(a: WanModel, b: WanModel):
    assert_same(a.state_dict(), b.state_dict())
    assert (a.causal, a.num_frame_per_block) == (b.causal, b.num_frame_per_block)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, CFG.in_dim, 4, 4, generator=gen)
    t = torch.tensor([[900.0, 500.0, 100.0]])
    ctx = torch.randn(1, 5, CFG.text_dim, generator=gen)
    assert torch.equal(a(x, t, ctx), b(x, t, ctx))


def test_build_from_folder_uses_meta_path(tmp_path, sd, ema_sd):
    folder = write_wan_folder(tmp_path / "wan", sd, sharded=False)
    model = build_wan_model(folder, causal=True, num_frame_per_block=3)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert_same_model(model, direct(sd, causal=True, num_frame_per_block=3))
    # a checkpoint on top replaces every tensor
    ckpt = tmp_path / "ckpt.pt"
    save_release_checkpoint(ckpt, sd, ema_sd)
    assert_same_model(build_wan_model(folder, causal=True, checkpoint_path=ckpt, use_ema=True),
                      direct(ema_sd, causal=True))
    bf16 = build_wan_model(folder, causal=False, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert_same(bf16.state_dict(), {k: v.bfloat16() for k, v in sd.items()})


def test_build_from_preset(tmp_path, sd):
    torch.manual_seed(0)
    random_model = build_wan_model("tiny", causal=False)
    torch.manual_seed(0)
    assert_same_model(random_model, WanModel(CFG))                    # same random init as a direct construction
    ckpt = tmp_path / "ckpt.pt"
    save_release_checkpoint(ckpt, sd)
    assert_same_model(build_wan_model("tiny", causal=True, checkpoint_path=ckpt), direct(sd, causal=True))
    with pytest.raises(ConfigError, match="unknown model preset"):
        build_wan_model("no-such-preset", causal=False)
    with pytest.raises(CheckpointError, match="not found"):
        build_wan_model(str(tmp_path / "missing" / "Wan2.1-T2V-1.3B"), causal=False)
    with pytest.raises(CheckpointError, match="hf download Wan-AI/Wan2.1-T2V-1.3B"):  # a folder name, not a preset
        build_wan_model("Wan2.1-T2V-1.3B", causal=False)
