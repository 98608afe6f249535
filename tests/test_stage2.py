"""Stage 2 on a tiny world: causal ODE data (get_causal_ode_data.py), LMDB round trip, ODE regression, causal CD.

The world: a tiny Wan folder, a random "Stage-1" causal checkpoint, and an LMDB of 3 ground-truth latents
``[6, 16, 4, 6]`` with captions. Float32 on the CPU, one thread (the CPU is shared; two threads under load are
~20x slower for these tiny matmuls).
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import get_causal_ode_data as ode_data
from model.kv_cache import KVCache
from model.loader import read_state_dict, save_release_checkpoint
from model.wan import WanModel
from pipeline import components
from pipeline.causal import BlockLoop, Guidance, StepSchedule, randn_like_from
from tests.tiny import rel
from toy.folders import DEFAULT_SENTENCES, TINY_DIT, write_tiny_wan_folder
from trainer.consistency import ConsistencyObjective
from trainer.objective import Phase
from trainer.ode import ODEObjective
from utils.config import load_config
from utils.create_lmdb_iterative import create_ode_lmdb
from utils.datasets import LatentLMDBDataset, ODERegressionLMDBDataset
from utils.ema import ShardLocalEMA
from utils.errors import ConfigError, DataError
from utils.lmdb_store import LATENTS, PROMPTS, LMDBReader, LMDBWriter
from utils.merge_lmdb import merge_lmdbs

REPO = Path(__file__).resolve().parent.parent
FRAMES, LATENT = 6, (16, 4, 6)
CAPTIONS = DEFAULT_SENTENCES[:3]
GUIDANCE = 6.0
log = logging.getLogger(__name__)


pytestmark = pytest.mark.usefixtures("single_thread")


def train_stage1(cfg, steps=120, lr=2e-3):
    """The "Stage-1" teacher: the tiny causal model after a few teacher-forcing flow-matching steps on the clean
    latents. A random model's flow is almost constant along the ODE, so 4 Euler steps would already match 48 and there
    would be nothing to distill; a little training makes the trajectories curve."""
    encoder = components.build_text_encoder(cfg, dtype=torch.float32)
    data = LatentLMDBDataset(cfg.data_path)
    x0 = torch.stack([data[i]["clean_latent"] for i in range(len(data))])
    context = encoder.encode([data[i]["prompts"] for i in range(len(data))])
    sch = components.build_scheduler(cfg)
    torch.manual_seed(1)
    model = WanModel(TINY_DIT, causal=True)
    with torch.no_grad():   # Wan zero-inits the head; the model must depend on its input from the start
        model.head.head.weight.normal_(std=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        t = sch.sample_training_timesteps(len(data), FRAMES)
        noise = torch.randn_like(x0)
        flow = model.forward_teacher_forcing(sch.add_noise(x0, noise, t), t, context, clean_x=x0)
        loss = F.mse_loss(flow, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    write_tiny_wan_folder(root / "wan_models" / "tiny")
    g = torch.Generator().manual_seed(2)
    with LMDBWriter(root / "clean_data") as writer:   # clean rows [1, F, C, H, W]
        writer.append(torch.randn(len(CAPTIONS), 1, FRAMES, *LATENT, generator=g), CAPTIONS)
    common = (f"wan_models_dir: {root / 'wan_models'}\ngenerator_name: tiny\ntext_encoder_name: tiny\n"
              f"image_or_video_shape: [1, {FRAMES}, {', '.join(map(str, LATENT))}]\n"
              f"mixed_precision: false\ngradient_checkpointing: false\ngenerator_ckpt: {root / 'stage1.pt'}\n")
    for name, base, extra in [("stage1", "ar_diffusion_tf_framewise", f"data_path: {root / 'clean_data'}\n"),
                              ("ode", "causal_ode_framewise", f"data_path: {root / 'ode_lmdb'}\nlr: 3.0e-4\n"),
                              ("cd", "causal_cd_framewise", f"data_path: {root / 'clean_data'}\nlr: 3.0e-4\n")]:
        (root / f"{name}.yaml").write_text(f"base: {REPO / 'configs' / base}.yaml\n{common}{extra}")
    save_release_checkpoint(root / "stage1.pt", train_stage1(load_config(root / "stage1.yaml")).state_dict())
    return root


def run_script(world, out, *extra):
    argv = ["--config_path", str(world / "stage1.yaml"), "--generator_ckpt", str(world / "stage1.pt"),
            "--rawdata_path", str(world / "clean_data"), "--output_folder", str(out), *extra]
    assert ode_data.main(argv) == 0


@pytest.fixture(scope="module")
def ode_files(world):
    run_script(world, world / "ode_latents")
    return world / "ode_latents"


def reference_trajectory(world, index, num_frame_per_block=1):
    """Independent recomputation: 48 Euler steps over ALL frames at once (teacher forcing on the ground truth,
    cond and uncond as separate passes). Returns (states before every step, final x)."""
    model = WanModel(TINY_DIT, causal=True, num_frame_per_block=num_frame_per_block).eval()
    model.load_state_dict(read_state_dict(world / "stage1.pt"))
    cfg = load_config(world / "stage1.yaml")
    encoder = components.build_text_encoder(cfg, dtype=torch.float32)
    ctx, neg = encoder.encode([CAPTIONS[index]]), encoder.encode([cfg.negative_prompt])
    gt = LatentLMDBDataset(world / "clean_data")[index]["clean_latent"][None]
    x = torch.randn(gt.shape, generator=torch.Generator().manual_seed(index))     # the script's (seed 0, i) noise
    sch = components.build_scheduler(cfg)
    ts = sch.inference_timesteps(48, 5.0).tolist()
    states = []
    with torch.no_grad():
        for j, t in enumerate(ts):
            states.append(x)
            tt = torch.full((1, FRAMES), t)
            c = model.forward_teacher_forcing(x, tt, ctx, clean_x=gt)
            u = model.forward_teacher_forcing(x, tt, neg, clean_x=gt)
            x = sch.step(u + GUIDANCE * (c - u), tt, x, torch.full((1, FRAMES), ts[j + 1] if j + 1 < 48 else 0.0))
    return states, x, gt


# ------------------------------------------------------------------------------------------------ ODE data script

def test_kept_steps_derive_from_the_warped_student_list():
    sch = components.build_scheduler(load_config(REPO / "configs" / "causal_ode_framewise.yaml"))
    grid = sch.inference_timesteps(48, 5.0).tolist()
    assert ode_data.record_indices(grid, sch.warp_steps([1000, 750, 500, 250]).tolist()) == [0, 12, 24, 36]
    assert ode_data.record_indices(sch.inference_timesteps(8, 5.0).tolist(),
                                   sch.warp_steps([1000, 750, 500, 250]).tolist()) == [0, 2, 4, 6]
    with pytest.raises(ConfigError, match="not on the 10-step Euler grid"):
        ode_data.record_indices(sch.inference_timesteps(10, 5.0).tolist(), sch.warp_steps([750]).tolist())
    assert list(ode_data.rank_indices(10, 1, 4)) == [1, 5, 9]


def test_ode_files_equal_full_sequence_teacher_forcing_sampler(world, ode_files):
    files = sorted(p.name for p in ode_files.iterdir())
    assert files == ["00000.pt", "00001.pt", "00002.pt"]
    for i in range(3):
        data = torch.load(ode_files / files[i], weights_only=True)
        assert list(data) == [CAPTIONS[i]]
        traj = data[CAPTIONS[i]]
        assert traj.shape == (1, 6, FRAMES, *LATENT) and traj.dtype == torch.float32
        states, final, gt = reference_trajectory(world, i)
        expected = torch.stack([states[0], states[12], states[24], states[36], final, gt], 1)
        errors = [rel(traj[:, s], expected[:, s]) for s in range(6)]
        log.info("sample %d: relative max error per slot %s", i, errors)
        assert max(errors) < 1e-5, f"sample {i}: relative max error per slot {errors}"
        assert rel(traj[:, 4], gt) > 0.1   # the teacher's ODE output is not the ground truth


def test_chunkwise_is_the_same_script_with_a_block_size(world, tmp_path):
    run_script(world, tmp_path, "--num_frame_per_block", "3", "--max_samples", "1")
    assert sorted(os.listdir(tmp_path)) == ["00000.pt"]
    traj = torch.load(tmp_path / "00000.pt", weights_only=True)[CAPTIONS[0]]
    states, final, gt = reference_trajectory(world, 0, num_frame_per_block=3)
    expected = torch.stack([states[0], states[12], states[24], states[36], final, gt], 1)
    assert rel(traj, expected) < 1e-5
    framewise = torch.load(world / "ode_latents" / "00000.pt", weights_only=True)[CAPTIONS[0]]
    assert rel(traj[:, 4], framewise[:, 4]) > 1e-3   # the block size changes the teacher-forcing mask


def test_batched_samples_write_the_same_files(world, ode_files, tmp_path):
    """--batch_size integrates samples together; each keeps its own seeded noise, prompt and file."""
    run_script(world, tmp_path, "--batch_size", "2")
    assert sorted(os.listdir(tmp_path)) == ["00000.pt", "00001.pt", "00002.pt"]   # a full batch and a partial one
    for i in range(3):
        batched = torch.load(tmp_path / f"{i:05d}.pt", weights_only=True)
        single = torch.load(ode_files / f"{i:05d}.pt", weights_only=True)
        assert list(batched) == [CAPTIONS[i]]
        assert rel(batched[CAPTIONS[i]], single[CAPTIONS[i]]) < 1e-5   # float32 batch vs one by one


def test_restart_skips_finished_files_and_redoes_partial_ones(world, ode_files, tmp_path, capsys):
    out = tmp_path / "ode"
    shutil.copytree(ode_files, out)
    for p in out.iterdir():
        os.utime(p, (1_000_000, 1_000_000))
    original = {i: torch.load(out / f"{i:05d}.pt", weights_only=True) for i in range(3)}
    whole = (out / "00001.pt").read_bytes()
    (out / "00001.pt").write_bytes(whole[: len(whole) // 2])           # killed while writing (non-atomic writer)
    (out / "00002.pt").rename(out / ".tmp-0123abcd-00002.pt")          # killed before the rename (utils.io name)
    (out / ".tmp-0123abcd-00002.pt").write_bytes(b"garbage")
    capsys.readouterr()
    run_script(world, out)
    summary = capsys.readouterr().out
    assert "2 trajectories written" in summary and "(1 partial files redone), 1 already finished" in summary, summary
    assert sorted(os.listdir(out)) == ["00000.pt", "00001.pt", "00002.pt"]     # the stale .tmp was replaced
    assert os.stat(out / "00000.pt").st_mtime == 1_000_000                     # finished: not recomputed
    for i in (1, 2):
        assert os.stat(out / f"{i:05d}.pt").st_mtime > 1_000_000
        redone = torch.load(out / f"{i:05d}.pt", weights_only=True)
        assert torch.equal(redone[CAPTIONS[i]], original[i][CAPTIONS[i]])   # the noise is seeded by the index


def test_torchrun_ranks_split_the_samples(world, ode_files, tmp_path):
    """Two ranks write the same files as one process: rank r takes samples r, r + 2, ... (CPU, gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "get_causal_ode_data.py"), "--config_path", str(world / "stage1.yaml"),
           "--generator_ckpt", str(world / "stage1.pt"), "--rawdata_path", str(world / "clean_data"),
           "--output_folder", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: 2 samples to write" in result.stderr and "rank 1: 1 samples to write" in result.stderr
    assert "3 trajectories written" in result.stdout and "on 2 rank(s)" in result.stdout, result.stdout
    for i in range(3):
        assert torch.equal(torch.load(tmp_path / f"{i:05d}.pt", weights_only=True)[CAPTIONS[i]],
                           torch.load(ode_files / f"{i:05d}.pt", weights_only=True)[CAPTIONS[i]])


@pytest.fixture(scope="module")
def ode_lmdb(world, ode_files):
    """create_lmdb_iterative on two folders (2 + 1 files) -> two shards -> merge_lmdb -> one LMDB."""
    for shard, names in enumerate([["00000.pt", "00001.pt"], ["00002.pt"]]):
        folder = world / f"pt_{shard}"
        folder.mkdir()
        for name in names:
            shutil.copy(ode_files / name, folder / name)
        assert create_ode_lmdb(folder, world / f"ode_lmdb_{shard}") == len(names)
    assert merge_lmdbs([world / "ode_lmdb_0", world / "ode_lmdb_1"], world / "ode_lmdb") == 3
    return world / "ode_lmdb"


def test_lmdb_round_trip_keeps_every_sample(ode_files, ode_lmdb):
    reader = LMDBReader(ode_lmdb)
    assert reader.shape(LATENTS) == (3, 6, FRAMES, *LATENT)
    for i in range(3):
        traj = torch.load(ode_files / f"{i:05d}.pt", weights_only=True)[CAPTIONS[i]][0]
        assert reader.get(PROMPTS, i) == CAPTIONS[i]
        assert torch.equal(torch.from_numpy(reader.get(LATENTS, i).copy()), traj.half())
    row = ODERegressionLMDBDataset(ode_lmdb)[0]["ode_latent"]
    assert row.shape == (6, FRAMES, *LATENT)


# ------------------------------------------------------------------------------------------------ training

def attach(objective):
    nets = objective.build_networks(torch.device("cpu"))
    objective.attach(nets)
    return nets


def loop_ema(objective):
    """What trainer/loop.py does for CD's ``ema_from_start`` phase: an EMA of the student from its initial weights,
    updated after every step, handed to the objective (which makes it the target). Returns the ``on_step`` hook."""
    ema = ShardLocalEMA(objective.networks.trainable["generator"], objective.cfg.ema_weight)
    objective.ema_updated("generator", ema, 0)

    def on_step(step):
        ema.update()
        objective.ema_updated("generator", ema, step)
    return on_step


def train(objective, steps, on_step=None):
    """Drive ``objective`` like the loop does (one micro-batch per step); returns the per-step losses."""
    gen = objective.networks.trainable["generator"]
    phase = objective.phases()[0]
    optimizer = torch.optim.AdamW(gen.parameters(), lr=phase.lr, betas=phase.betas, weight_decay=0.0)
    data = objective.data(0, 1, seed=0)
    losses = []
    for step in range(steps):
        loss, metrics = objective.loss("generator", next(data), step)
        assert torch.isfinite(loss) and set(metrics) == {"loss", "timestep"}
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), phase.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses


@torch.no_grad()
def ode_eval_loss(objective, dataset):
    """The regression loss over every sample and every step index (deterministic)."""
    gen, sch = objective.networks.trainable["generator"], objective.scheduler
    total = []
    for i in range(len(dataset)):
        item = dataset[i]
        ode = item["ode_latent"][None]
        ctx = objective.networks.frozen["text_encoder"].encode([item["prompts"]])
        for j, t in enumerate(objective.timesteps.tolist()):
            tt = torch.full((1, FRAMES), t)
            flow = gen.forward_teacher_forcing(ode[:, j], tt, ctx, clean_x=ode[:, -1])
            total.append(F.mse_loss(sch.flow_to_x0(flow, ode[:, j], tt), ode[:, -2]).item())
    return sum(total) / len(total)


@torch.no_grad()
def few_step_mse(model, cfg, encoder, dataset, rule="euler", guidance_scale=1.0):
    """MSE between 4-step causal samples (BlockLoop) from each trajectory's noise and the teacher's 48-step ODE output
    for that noise, with the ground truth as context as when the data was made (teacher forcing)."""
    model.eval()
    sch = components.build_scheduler(cfg)
    steps = StepSchedule.from_config(sch, cfg.denoising_step_list, warp=cfg.warp_denoising_step).timesteps
    negative = encoder.encode([cfg.negative_prompt]) if guidance_scale != 1.0 else None
    errors = []
    for i in range(len(dataset)):
        item = dataset[i]
        ode = item["ode_latent"][None]
        guidance = Guidance(encoder.encode([item["prompts"]]), negative, guidance_scale)
        cache = KVCache.for_model(model, 2 if guidance.batched else 1, *LATENT[1:], capacity_frames=FRAMES)
        loop = BlockLoop(model, sch, StepSchedule(steps, rule=rule), guidance, cache,
                         noise_fn=randn_like_from(torch.Generator().manual_seed(i)))
        sample = torch.cat([x0 for _, x0 in loop.run(ode[:, 0], context_latents=ode[:, -1])], 1)
        errors.append(F.mse_loss(sample, ode[:, -2]).item())
    model.train()
    return sum(errors) / len(errors)


def test_ode_regression_lowers_its_loss_and_beats_the_undistilled_model(world, ode_lmdb):
    """The 4-step student (no guidance: the teacher's CFG is distilled in) against the Stage-1 model sampled with the
    same 4 steps, with the teacher's guidance 6 or without, from the same noise and the same ground-truth context.

    Asserted for the deterministic Euler rule. With the re-noising rule of few-step inference, fresh noise enters at
    every step and decides the sample as much as the initial noise does, so "MSE to the same-noise ODE output" is not a
    meaningful target there; those numbers are only reported.
    """
    cfg = load_config(world / "ode.yaml")
    assert cfg.beta1 == 0.9 and cfg.trainer == "ode"
    objective = ODEObjective(cfg)
    assert objective.phases() == [Phase("generator", lr=3e-4, betas=(0.9, 0.999), max_grad_norm=10.0, ema=False)]
    assert objective.timesteps.tolist() == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)
    nets = attach(objective)
    dataset, encoder, gen = ODERegressionLMDBDataset(ode_lmdb), nets.frozen["text_encoder"], nets.trainable["generator"]
    before = ode_eval_loss(objective, dataset)
    undistilled = {g: few_step_mse(gen, cfg, encoder, dataset, guidance_scale=g) for g in (1.0, GUIDANCE)}
    undistilled_renoise = few_step_mse(gen, cfg, encoder, dataset, rule="renoise")
    losses = train(objective, 60)
    after = ode_eval_loss(objective, dataset)
    distilled = few_step_mse(gen, cfg, encoder, dataset)
    distilled_renoise = few_step_mse(gen, cfg, encoder, dataset, rule="renoise")
    numbers = (f"regression loss {before:.4f} -> {after:.4f} (train {losses[0]:.4f} -> {losses[-1]:.4f}); 4-step Euler "
               f"MSE to the 48-step teacher: distilled {distilled:.4f}, undistilled {undistilled[1.0]:.4f} (no CFG) / "
               f"{undistilled[GUIDANCE]:.4f} (CFG {GUIDANCE}); re-noising: distilled {distilled_renoise:.4f}, "
               f"undistilled {undistilled_renoise:.4f}")
    log.info(numbers)
    assert after < 0.3 * before, numbers
    assert distilled < 0.5 * min(undistilled.values()), numbers


def test_ode_per_block_steps_and_resumable_data(world, ode_lmdb):
    objective = ODEObjective(load_config(world / "ode.yaml"), per_block_steps=True)
    gen = attach(objective).trainable["generator"]
    seen = []
    forward = gen.forward_teacher_forcing
    gen.forward_teacher_forcing = lambda x, t, *a, **k: (seen.append((x, t)), forward(x, t, *a, **k))[1]
    data = objective.data(0, 1, seed=0)
    batch = next(data)
    loss, metrics = objective.loss("generator", batch, 0)
    (x, t), = seen
    j = [objective.timesteps.tolist().index(v) for v in t[0].tolist()]   # the step index of every frame
    assert len(set(j)) > 1, "per_block_steps draws one step per block (frame-wise: per frame)"
    assert all(torch.equal(x[0, f], batch["ode_latent"][0, j[f], f]) for f in range(FRAMES))
    assert torch.isfinite(loss)
    state = objective.data_state()
    following = [next(data)["prompts"] for _ in range(4)]   # crosses an epoch boundary (3 samples)
    for load_before_data in (True, False):   # a restart may restore the position before or after data()
        resumed = ODEObjective(load_config(world / "ode.yaml"))
        if load_before_data:
            resumed.load_data_state(state)
        batches = resumed.data(0, 1, seed=0)
        if not load_before_data:
            resumed.load_data_state(state)
        assert [next(batches)["prompts"] for _ in range(4)] == following


def test_ode_rejects_mismatched_data(world, ode_lmdb):
    cfg = load_config(world / "ode.yaml", ["denoising_step_list=[1000,500]"])
    with pytest.raises(DataError, match="4 slots"):
        ODEObjective(cfg).data(0, 1, seed=0)
    with pytest.raises(ConfigError, match="denoising_step_list"):
        ODEObjective(load_config(world / "ode.yaml", ["denoising_step_list=null"]))
    other = f"image_or_video_shape=[1,{FRAMES + 3},{','.join(map(str, LATENT))}]"   # the generator takes any length
    for cfg, make in ((load_config(world / "ode.yaml", [other]), ODEObjective),
                      (load_config(world / "cd.yaml", [other]), ConsistencyObjective)):
        with pytest.raises(DataError, match=rf"latents are \[F, C, H, W\] = \[{FRAMES}, .*shape\[1:\] is "
                                            rf"\[{FRAMES + 3}, "):
            make(cfg).data(0, 1, seed=0)


@torch.no_grad()
def cd_eval_loss(objective, batch, seeds=8):
    """The CD loss of one batch averaged over fixed draws (n, ε), student against the current target."""
    state = torch.get_rng_state()
    values = []
    for seed in range(seeds):
        torch.manual_seed(100 + seed)
        values.append(objective.loss("generator", batch, 0)[0].item())
    torch.set_rng_state(state)
    return sum(values) / len(values)


def test_consistency_distillation_lowers_its_loss(world):
    """On an 8-step grid: with the shipped 48 the tiny teacher's one-step mismatch (~4e-4) is at the optimizer's
    noise floor, so there is little to lower."""
    shipped = load_config(world / "cd.yaml")
    assert shipped.guidance_scale == 3.0 and shipped.discrete_cd_N == 48 and shipped.ema_weight == 0.99
    assert len(ConsistencyObjective(shipped).grid) == 48
    objective = ConsistencyObjective(load_config(world / "cd.yaml", ["discrete_cd_N=8", "lr=1e-4"]))
    nets = attach(objective)
    assert objective.grid[0].item() == 1000.0 and len(objective.grid) == 8
    assert objective.phases()[0].ema   # the loop keeps the EMA that becomes the target
    assert not any(p.requires_grad for p in nets.frozen["teacher"].parameters())
    teacher_before = {k: v.clone() for k, v in nets.frozen["teacher"].state_dict().items()}
    batch = next(objective.data(0, 1, seed=0))
    before = cd_eval_loss(objective, batch)
    losses = train(objective, 40, loop_ema(objective))
    after = cd_eval_loss(objective, batch)
    numbers = (f"CD loss on a fixed batch and draws {before:.5f} -> {after:.5f} "
               f"(train {losses[0]:.5f} -> {losses[-1]:.5f})")
    log.info(numbers)
    assert after < 0.6 * before, numbers
    assert all(torch.equal(v, nets.frozen["teacher"].state_dict()[k]) for k, v in teacher_before.items())
    student, target = nets.trainable["generator"], nets.frozen["target"]
    assert not torch.equal(student.head.head.weight, target.head.head.weight)


def test_consistency_target_is_the_reference_ema_from_step_zero(world, tmp_path):
    """In the shared loop CD's target is the reference's: the EMA of the student from the Stage-1 weights, updated
    after every step whatever ema_start_step (2 here), which only decides when the release export holds it."""
    from torch.distributed.tensor import DTensor

    from trainer.loop import Trainer
    from utils.checkpoint import release_path

    cfg = load_config(world / "cd.yaml", ["ema_weight=0.5", "ema_start_step=2", "discrete_cd_N=8",
                                          f"logdir={tmp_path}"])
    objective = ConsistencyObjective(cfg)
    trainer = Trainer(cfg, objective)
    local = lambda t: t._local_tensor if isinstance(t, DTensor) else t  # noqa: E731
    params = lambda net: {k: local(v).detach().clone() for k, v in net.named_parameters()}  # noqa: E731
    try:
        trainer.setup()
        student, target = trainer.networks.trainable["generator"], objective.networks.frozen["target"]
        expected = params(student)   # the EMA starts at the Stage-1 weights
        for step in range(5):
            trainer.train_step(step)
            for k, v in params(student).items():
                expected[k].lerp_(v, 0.5)
            got = params(target)
            for k in expected:
                assert torch.allclose(got[k], expected[k], atol=1e-6), (step, k)
                assert torch.allclose(local(trainer.emas["generator"].shadow[k]), expected[k], atol=1e-6), (step, k)
        for step in (2, 3):
            trainer._export_release(step)
        assert list(torch.load(release_path(tmp_path, 2), weights_only=True)) == ["generator"]
        assert list(torch.load(release_path(tmp_path, 3), weights_only=True)) == ["generator", "generator_ema"]
    finally:
        trainer._close(None, finished=True)


def test_objectives_run_and_resume_in_the_shared_loop(world, ode_lmdb, tmp_path):
    """trainer/loop.py (FSDP2 over one gloo rank): ODE regression trains; CD's target is the loop's EMA from
    ema_start_step on and again after a resume."""
    from torch.distributed.tensor import DTensor

    from trainer.loop import Trainer

    local = lambda t: t._local_tensor if isinstance(t, DTensor) else t  # noqa: E731
    cfg = load_config(world / "ode.yaml", ["max_steps=2", f"logdir={tmp_path / 'ode'}"])
    assert Trainer(cfg, ODEObjective(cfg)).train() == 2
    for steps in (3, 5):   # the second run resumes from the checkpoint of the first
        cfg = load_config(world / "cd.yaml", [f"max_steps={steps}", f"logdir={tmp_path / 'cd'}", "ema_start_step=2",
                                              "discrete_cd_N=8"])
        objective = ConsistencyObjective(cfg)
        trainer = Trainer(cfg, objective)
        assert trainer.train() == steps
        shadow = trainer.emas["generator"].shadow
        target = dict(objective.networks.frozen["target"].named_parameters())
        assert all(torch.equal(local(target[name]), local(value)) for name, value in shadow.items())


@pytest.mark.parametrize("stage", ["ode", "cd"])
def test_kill_and_resume_equals_the_uninterrupted_run(world, ode_lmdb, tmp_path, stage):
    """Killed during step 3 and resumed from the step-2 checkpoint, ODE regression and consistency distillation
    compute the same losses as an uninterrupted run (noise and timesteps come from the global RNG the checkpoint
    restores; building the DataLoader afresh must not draw from it). CD's target EMA starts at step 1, so it is
    restored too."""
    from tests._resume import assert_same_losses, kill_resume_losses

    # ODE regression's only draw is its step index: per block (6 draws of 4 values) a wrong RNG state cannot hide
    make = {"ode": lambda cfg: ODEObjective(cfg, per_block_steps=True), "cd": ConsistencyObjective}[stage]
    cfg = load_config(world / f"{stage}.yaml", ["discrete_cd_N=8", "ema_start_step=1", "sharding_strategy=full"])
    assert_same_losses(*kill_resume_losses(make, cfg, tmp_path))


def test_sigkill_inside_a_checkpoint_save_then_train_py_resumes_exactly(world, ode_lmdb, tmp_path):
    """The real thing, end to end: ``train.py`` (consistency distillation: noise and grid indices from the restored
    RNG, the target EMA) in a subprocess is killed with SIGKILL after writing the step-4 checkpoint's files and before
    publishing it; running the same command again resumes from step 2. metrics.jsonl then holds one row per step, and
    steps 3-4 equal an uninterrupted run's (1e-6 relative)."""
    import json
    import signal

    import train

    argv = lambda logdir: ["--config_path", str(world / "cd.yaml"), "--logdir", str(logdir), "--override",  # noqa
                           "max_steps=4", "log_iters=2", "log_every=1", "sharding_strategy=full", "discrete_cd_N=8",
                           "ema_start_step=1"]
    kill_in_save = ("import os, signal, sys\nfrom utils import checkpoint\nreal = checkpoint._commit\n"
                    "def commit(tmp, final):\n    if final.name == 'step_000004':\n"
                    "        os.kill(os.getpid(), signal.SIGKILL)\n    real(tmp, final)\n"
                    "checkpoint._commit = commit\nimport train\nsys.exit(train.main(sys.argv[1:]))\n")
    run = subprocess.run([sys.executable, "-c", kill_in_save, *argv(tmp_path / "killed")], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "step_000004.tmp").is_dir()     # written, never published
    assert train.main(argv(tmp_path / "killed")) == 0
    assert train.main(argv(tmp_path / "whole")) == 0

    def losses(logdir):
        rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2, 3, 4]
        return [row["generator_loss"] for row in rows]

    for got, want in zip(losses(tmp_path / "killed"), losses(tmp_path / "whole")):
        assert abs(got - want) <= 1e-6 * abs(want), (got, want)
