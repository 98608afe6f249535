"""Stage 3 (DMD with self-forcing rollout) on tiny CPU models: phase isolation, exit-step gradients, the DMD gradient
against a hand computation, a short distillation that moves the generator towards a teacher, and the shipped configs.
"""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import WanConfig
from model.scheduler import FlowMatchScheduler
from model.wan import WanModel
from pipeline.causal import StepSchedule
from pipeline.rollout import denoised_timestep_range, draw_exit_steps, self_forcing_rollout
from tests.tiny import recorded_noise, rel
from toy.bidirectional import sample_bidirectional
from toy.folders import write_tiny_wan_folder
from trainer.dmd import DMDObjective
from trainer.objective import Networks
from utils.config import load_config
from utils.distributed import (
    activation_checkpointed,
    apply_activation_checkpointing,
    apply_fsdp,
    close_distributed,
    init_distributed,
)
from utils.errors import ConfigError

# 4 latent channels of 4x4 (4 tokens per frame): every test here runs in well under a second per step.
DIT = WanConfig(dim=32, ffn_dim=64, freq_dim=16, text_dim=32, num_heads=2, num_layers=2, text_len=8,
                in_dim=4, out_dim=4)
C, H, W = 4, 4, 4
PROMPTS = [f"a red circle moving left {i}" for i in range(12)]


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(causal=False, seed=0, k=1, head_std=0.05):
    torch.manual_seed(seed)
    m = WanModel(DIT, causal=causal, num_frame_per_block=k)
    with torch.no_grad():  # Wan zero-inits the head; a random test model must depend on its input
        m.head.head.weight.normal_(std=head_std)
    return m


def dmd_config(tmp_path: Path, frames: int, overrides=(), config="causal_forcing_dmd_framewise.yaml",
               names=("gen", "teacher", "teacher")):
    """A DMD config over tiny model folders ``tmp_path/wan/{gen,teacher,...}`` and a prompt file."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    gen, real, fake = names
    return load_config(Path(__file__).resolve().parent.parent / "configs" / config, [
        f"wan_models_dir={tmp_path / 'wan'}", f"generator_name={gen}", f"real_name={real}", f"fake_name={fake}",
        f"text_encoder_name={real}", "generator_ckpt=null", f"data_path={prompts}",
        f"image_or_video_shape=[1,{frames},{C},{H},{W}]", f"num_training_frames={frames}", *overrides])


# ----------------------------------------------------------------------------------------------------------------
# 1. one generator step and one critic step: each phase trains only its own network


def test_generator_and_critic_steps_touch_only_their_network(tmp_path):
    write_tiny_wan_folder(tmp_path / "wan" / "gen", dit=DIT, seed=1)
    write_tiny_wan_folder(tmp_path / "wan" / "teacher", dit=DIT, seed=2)
    write_tiny_wan_folder(tmp_path / "wan" / "critic", dit=DIT, seed=3)
    cfg = dmd_config(tmp_path, 3, ["batch_size=2"], names=("gen", "teacher", "critic"))
    obj = DMDObjective(cfg)
    nets = obj.build_networks(torch.device("cpu"))
    obj.attach(nets)
    gen, critic, real = nets.trainable["generator"], nets.trainable["critic"], nets.frozen["real_score"]
    assert gen.causal and not critic.causal and not real.causal
    # critic initialised from its own (Wan) folder, not from the generator
    assert not torch.equal(critic.blocks[0].ffn[0].weight, gen.blocks[0].ffn[0].weight)
    assert obj.phases_at(0) == ["generator", "critic"] and obj.phases_at(1) == ["critic"]
    phases = {p.name: p for p in obj.phases()}
    assert phases["generator"].ema and not phases["critic"].ema
    assert phases["critic"].lr == cfg.lr_critic and phases["generator"].betas == (cfg.beta1, cfg.beta2)
    opts = {name: torch.optim.AdamW(nets.trainable[name].parameters(), lr=1e-3) for name in phases}
    data = obj.data(rank=0, world_size=1, seed=0)
    nets_all = {"generator": gen, "critic": critic, "real_score": real}
    for phase in obj.phases_at(0):
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in nets_all.items()}
        batch = next(data)
        assert len(batch["prompts"]) == 2
        loss, metrics = obj.loss(phase, batch, step=0)
        assert loss.dtype == torch.float64 and torch.isfinite(loss)
        assert f"{phase}_loss" in metrics and "exit_step" in metrics
        for m in nets_all.values():
            m.zero_grad(set_to_none=True)
        loss.backward()
        for name, m in nets_all.items():
            grads = [p.grad for p in m.parameters() if p.grad is not None]
            if name == phase:
                assert grads and sum(g.abs().sum() for g in grads) > 0, f"{phase}: no gradient reached {name}"
            else:
                assert not grads, f"{phase} phase: {len(grads)} gradients leaked into {name}"
        torch.nn.utils.clip_grad_norm_(nets_all[phase].parameters(), phases[phase].max_grad_norm)
        opts[phase].step()
        for name, m in nets_all.items():
            changed = any(not torch.equal(a, p) for a, p in zip(before[name], m.parameters()))
            assert changed == (name == phase), f"{phase} step changed {name}: {changed}"
    assert "dmdtrain_gradient_norm" in obj.loss("generator", next(data), 5)[1]
    # a resumed sampler continues at the same prompts
    state = obj.data_state()
    nxt = next(data)
    obj2 = DMDObjective(cfg)
    data2 = obj2.data(rank=0, world_size=1, seed=0)
    obj2.load_data_state(state)
    assert next(data2) == nxt


def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path):
    """Killed during step 3 and resumed from the step-2 checkpoint: generator and critic losses equal an uninterrupted
    run's (rollout noise and exit steps from the restored RNG, the prompt sampler's position, both optimizers, the
    generator's EMA)."""
    from tests._resume import assert_same_losses, kill_resume_losses

    write_tiny_wan_folder(tmp_path / "wan" / "gen", dit=DIT, seed=1)
    write_tiny_wan_folder(tmp_path / "wan" / "teacher", dit=DIT, seed=2)
    cfg = dmd_config(tmp_path, 3, ["batch_size=2", "dfake_gen_update_ratio=2", "ema_start_step=1",
                                   "mixed_precision=false", "gradient_checkpointing=false",
                                   "sharding_strategy=full"])
    uninterrupted, resumed = kill_resume_losses(DMDObjective, cfg, tmp_path / "runs")
    assert sorted(resumed) == [("critic", 2), ("critic", 3), ("generator", 2)]
    assert_same_losses(uninterrupted, resumed)


# ----------------------------------------------------------------------------------------------------------------
# 2. gradients flow only through the exit step


def replay_rollout(model, sch, schedule, ctx, noise, exits, context_noise, noise_seq, k, grad_everywhere=False):
    """Independent recomputation with ``forward_cached`` directly: steps before the exit under explicit no_grad (or
    all with grad for the negative control), the exit forward replayed with grad, context passes under no_grad."""
    from model.kv_cache import KVCache
    b, frames = noise.shape[:2]
    cache = KVCache(DIT.num_layers, b, DIT.tokens_per_frame(H, W), DIT.num_heads, DIT.head_dim, frames)
    draws = iter(noise_seq)
    outs = []
    for block, start in enumerate(range(0, frames, k)):
        steps = schedule.for_block(block)
        x = noise[:, start:start + k]
        for j in range(exits[block] + 1):
            tt = torch.full((b, k), steps[j])
            grad = grad_everywhere or j == exits[block]
            with torch.set_grad_enabled(grad):
                x0 = sch.flow_to_x0(model.forward_cached(x, tt, ctx, cache, start,
                                                         mode="rollout" if grad else "inference"), x, tt)
                if j < exits[block]:
                    x = sch.add_noise(x0, next(draws), torch.full((b, k), steps[j + 1]))
        outs.append(x0)
        if start + k < frames:
            with torch.no_grad():
                tc = torch.full((b, k), float(context_noise))
                model.forward_cached(sch.add_noise(x0.detach(), next(draws), tc), tc, ctx, cache, start)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("exit_step, first, first_list", [(2, None, None), ([1, 3, 0], None, None),
                                                           (1, 3, [1000, 750, 500, 250])])
def test_rollout_gradient_flows_only_through_exit_forward(exit_step, first, first_list):
    """The rollout (with gradient checkpointing, as in training) gives the same generator gradient as a replay that
    runs everything before each exit under explicit no_grad and replays only the exit forward with grad; letting
    gradients through the earlier steps instead changes the gradient (so the comparison is sensitive)."""
    k, frames = 2, 6
    sch = FlowMatchScheduler(shift=5.0)
    steps = [1000, 750, 500, 250] if first_list is None else [1000, 500]
    schedule = StepSchedule.from_config(sch, steps, first_list)
    model = tiny_model(causal=True, seed=4, k=k, head_std=0.2)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, frames, C, H, W, generator=g)
    ctx = torch.randn(2, 5, DIT.text_dim, generator=g)
    weight = torch.randn(2, frames, C, H, W, generator=g)

    def grads_of(fn, net=model):
        net.zero_grad(set_to_none=True)
        (fn() * weight).sum().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]

    fn, drawn = recorded_noise(1)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed)   # as the training loop applies it
    result = {}
    g_roll = grads_of(lambda: result.setdefault("r", self_forcing_rollout(
        checkpointed, sch, schedule, ctx, frames, latent_shape=(C, H, W), exit_step=exit_step,
        first_block_exit_step=first, context_noise=50, noise_fn=fn, noise=noise)).latents, checkpointed)
    exits = exit_step if isinstance(exit_step, list) else [first if (b == 0 and first is not None) else exit_step
                                                           for b in range(frames // k)]
    g_replay = grads_of(lambda: replay_rollout(model, sch, schedule, ctx, noise, exits, 50, drawn, k))
    g_full = grads_of(lambda: replay_rollout(model, sch, schedule, ctx, noise, exits, 50, drawn, k, True))
    flat = lambda gs: torch.cat([x.flatten() for x in gs])  # noqa: E731
    err = rel(flat(g_roll), flat(g_replay))
    assert err < 1e-5, f"rollout vs exit-only replay: relative gradient error {err:.2e} (tolerance 1e-5)"
    gap = rel(flat(g_full), flat(g_replay))
    assert gap > 1e-3, f"gradient through the pre-exit steps should differ, relative gap only {gap:.2e}"
    # bookkeeping of the non-first blocks' exit step (training.md §6.3 table)
    shared = exits[1]
    expect = {(4, 0): (1000, 750), (4, 1): (750, 500), (4, 2): (500, 250), (4, 3): (250, 0),
              (2, 0): (1000, 500), (2, 1): (500, 0)}[(len(steps), shared)]
    assert (result["r"].denoised_timestep_from, result["r"].denoised_timestep_to) == expect


def test_rollout_grad_from_frame_and_exit_draws():
    sch = FlowMatchScheduler(shift=5.0)
    schedule = StepSchedule.from_config(sch, [1000, 500], [1000, 750, 500, 250])
    model = tiny_model(causal=True, seed=5, k=1)
    ctx = torch.randn(1, 4, DIT.text_dim)
    out = self_forcing_rollout(model, sch, schedule, ctx, 3, latent_shape=(C, H, W), exit_step=1, grad_from_frame=1)
    assert out.latents.shape == (1, 3, C, H, W)
    assert out.latents[:, :1].grad_fn is None or not _depends_on_params(out.latents[:, :1], model)
    assert _depends_on_params(out.latents[:, 1:], model)
    assert draw_exit_steps(schedule, 3, last_step_only=True) == (1, 3)
    torch.manual_seed(0)
    draws = [draw_exit_steps(schedule, 3) for _ in range(200)]
    assert {e for e, _ in draws} == {0, 1} and {f for _, f in draws} == {0, 1, 2, 3}
    per_block, first = draw_exit_steps(schedule, 3, same_step_across_blocks=False)
    assert len(per_block) == 3 and per_block[0] == first


@pytest.mark.parametrize("window, checkpointed, grad, raises", [
    (2, True, True, True),      # checkpointed rollout longer than the window: the ring wraps -> refused
    (2, False, True, False),    # no checkpointing: nothing is recomputed
    (-1, True, True, False),    # the cache holds the whole rollout: nothing is overwritten
    (2, True, False, False),    # no gradients (the critic's samples): nothing is recomputed
])
def test_rollout_refuses_a_wrapping_cache_under_the_loops_checkpointing(window, checkpointed, grad, raises):
    """Checkpointing applied the way trainer/loop.py applies it (wrappers per block, then FSDP2 over a one-rank group)
    is what the rollout's guard sees: recomputed blocks would read K/V the wrapped ring has overwritten."""
    init_distributed()
    try:
        torch.manual_seed(0)
        model = WanModel(DIT, causal=True, local_attn_size=window)
        if checkpointed:
            apply_activation_checkpointing(model)
        apply_fsdp(model, "full", mixed_precision=False)
        assert activation_checkpointed(model) == checkpointed
        schedule = StepSchedule.from_config(FlowMatchScheduler(shift=5.0), [1000, 500])
        ctx = torch.randn(1, 4, DIT.text_dim)
        with torch.set_grad_enabled(grad):
            run = lambda: self_forcing_rollout(model, FlowMatchScheduler(shift=5.0), schedule, ctx, 4,  # noqa: E731
                                               latent_shape=(C, H, W), exit_step=1)
            if raises:
                with pytest.raises(ConfigError) as err:
                    run()
                message = str(err.value)
                assert "\n" not in message and "4 frames wraps the 2-frame attention window" in message
                assert "gradient_checkpointing: false" in message and "local_attn_size" in message
            else:
                assert run().latents.requires_grad == grad   # no graph at all for a rollout under no_grad
    finally:
        close_distributed()


def _depends_on_params(t, model):
    grads = torch.autograd.grad(t.sum(), list(model.parameters()), allow_unused=True, retain_graph=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------------------------------------
# 3. the DMD gradient against a hand computation


def hand_sigma(t, n=1000, shift=5.0):
    """σ of the nearest entry of the shifted training grid, from the formula (float64)."""
    raw = 1 - torch.arange(n, dtype=torch.float64) / n
    sig = shift * raw / (1 + (shift - 1) * raw)
    index = (sig * n - t.double().unsqueeze(-1)).abs().argmin(-1)
    return sig[index]


def score_objective(tmp_path, overrides=()):
    cfg = dmd_config(tmp_path, 4, list(overrides))
    obj = DMDObjective(cfg, text_encoder=False)
    real, fake = tiny_model(seed=7).eval(), tiny_model(seed=8).eval()
    obj.attach(Networks(trainable={"generator": tiny_model(True, seed=9), "critic": fake}, frozen={"real_score": real}))
    return obj, real, fake


@pytest.mark.parametrize("fake_scale, frame0_weight", [(0.0, 1.0), (1.5, 1.0), (1.5, 3.0)])
def test_dmd_gradient_matches_hand_computation(tmp_path, fake_scale, frame0_weight):
    obj, real, fake = score_objective(tmp_path, ["real_guidance_scale=3.0", f"fake_guidance_scale={fake_scale}",
                                                 f"first_frame_loss_weight={frame0_weight}"])
    g = torch.Generator().manual_seed(0)
    b, frames = 2, 4
    x = torch.randn(b, frames, C, H, W, generator=g).requires_grad_(True)
    noise = torch.randn(b, frames, C, H, W, generator=g)
    ctx, neg = torch.randn(b, 6, DIT.text_dim, generator=g), torch.randn(1, 3, DIT.text_dim, generator=g)
    obj.negative_embeds = neg
    t = torch.tensor([[312.0] * frames, [871.0] * frames])   # one timestep per sample, shared by its frames
    loss, metrics = obj.distribution_matching_loss(x, ctx, t=t, noise=noise)
    loss.backward()
    # by hand, float64: separate conditional / unconditional passes, x0 = x_t - σ v
    with torch.no_grad():
        sigma = hand_sigma(t)[..., None, None, None]
        xd = x.detach().double()
        x_t = ((1 - sigma) * xd + sigma * noise.double()).float()

        def x0(model, context):
            return x_t.double() - sigma * model(x_t, t, context).double()
        negb = neg.expand(b, -1, -1)
        cond, uncond = x0(real, ctx), x0(real, negb)
        x0_real = cond + 3.0 * (cond - uncond)
        x0_fake = x0(fake, ctx)
        if fake_scale:
            x0_fake = x0_fake + fake_scale * (x0_fake - x0(fake, negb))
        normaliser = (xd - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        G = (x0_fake - x0_real) / normaliser
        # latent frame 0 weighted frame0_weight against 1 for the others, rescaled to mean 1
        w = torch.tensor([frame0_weight] + [1.0] * (frames - 1), dtype=torch.float64)
        w = (w * frames / w.sum()).view(1, frames, 1, 1, 1)
    expected = w * G / x.numel()
    err = rel(x.grad.double(), expected)
    assert err < 1e-4, f"dLoss/dx vs w G/numel: relative error {err:.2e} (tolerance 1e-4, float32 networks)"
    assert abs(loss.item() - 0.5 * (w * G ** 2).mean().item()) < 1e-4 * loss.item()
    assert abs(metrics["dmdtrain_gradient_norm"].item() - G.abs().mean().item()) < 1e-4 * G.abs().mean().item()


@pytest.mark.parametrize("kind", ["flow", "x0"])
def test_critic_loss_targets(tmp_path, kind):
    """Flow loss = MSE(v̂, ε − x) where v̂ is the network's flow (the float64 x0 round trip is exact); x0 loss =
    MSE(x_t − σv, x). Only the critic receives gradients."""
    obj, real, fake = score_objective(tmp_path, [f"denoising_loss_type={kind}"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, C, H, W, generator=g)
    noise = torch.randn_like(x)
    ctx = torch.randn(2, 6, DIT.text_dim, generator=g)
    t = torch.tensor([[100.0] * 4, [640.0] * 4])
    loss, _ = obj.critic_loss(x, ctx, t=t, noise=noise)
    with torch.no_grad():
        sigma = hand_sigma(t)[..., None, None, None]
        x_t = ((1 - sigma) * x.double() + sigma * noise.double()).float()
        v = fake(x_t, t, ctx).double()
        want = F.mse_loss(v, noise.double() - x.double()) if kind == "flow" else \
            F.mse_loss(x_t.double() - sigma * v, x.double())
    # tolerance 1e-6: x_t is rounded to float32 on both sides (σ float32 in the scheduler, float64 here)
    assert abs(loss.item() - want.item()) < 1e-6 * want.item()
    loss.backward()
    assert all(p.grad is None for p in real.parameters())
    assert any(p.grad is not None for p in fake.parameters())


# ----------------------------------------------------------------------------------------------------------------
# 4. a short distillation moves the generator's samples towards the teacher's


def channel_stats(x):
    """Per-channel mean and std over (B, F, H, W) of ``[B, F, C, H, W]``."""
    flat = x.transpose(0, 2).reshape(x.shape[2], -1)
    return flat.mean(1), flat.std(1)


def train_teacher(steps, mu, sd, frames, ctx_bank):
    """A tiny bidirectional 'Wan' trained by flow matching on latents x0 ~ N(mu_c, sd_c^2) per channel."""
    sch = FlowMatchScheduler(shift=5.0)
    teacher = tiny_model(seed=0, head_std=0.02)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(steps):
        x0 = mu.view(1, 1, C, 1, 1) + sd.view(1, 1, C, 1, 1) * torch.randn(32, frames, C, H, W)
        eps = torch.randn_like(x0)
        t = sch.sample_training_timesteps(32, frames, uniform=True)
        loss = F.mse_loss(teacher(sch.add_noise(x0, eps, t), t, ctx_bank[torch.randint(len(ctx_bank), (32,))]),
                          eps - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


def test_dmd_moves_generator_towards_teacher(tmp_path):
    """Teacher: trained on per-channel Gaussian latents (means ±1, ±0.5); its 20-step Euler samples define the
    target statistics. Generator: a random 4-step causal model (means ~0, std ~0.7). Critic and real score both
    start from the teacher's weights (as in the recipe). 300 DMD steps (generator every 2nd step) must at least
    halve the distance  mean_c |mean_gen - mean_teacher| + mean_c |std_gen - std_teacher|  and shrink its std part.
    """
    frames = 2
    mu, sd = torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.tensor([0.3, 0.6, 0.4, 0.2])
    teacher = train_teacher(200, mu, sd, frames, torch.randn(8, 8, DIT.text_dim) * 0.1)
    sch = FlowMatchScheduler(shift=5.0)
    with torch.no_grad():
        target = sample_bidirectional(teacher, sch, torch.randn(64, frames, C, H, W), torch.zeros(64, 8, DIT.text_dim),
                                      StepSchedule(sch.inference_timesteps(20).tolist(), rule="euler"))
    t_mean, t_std = channel_stats(target)
    write_tiny_wan_folder(tmp_path / "wan" / "gen", dit=DIT, seed=1)
    write_tiny_wan_folder(tmp_path / "wan" / "teacher", dit=DIT, dit_state_dict=teacher.state_dict(), seed=2)
    cfg = dmd_config(tmp_path, frames, ["real_guidance_scale=0", "batch_size=4", "dfake_gen_update_ratio=2",
                                        "gradient_checkpointing=false"])
    obj = DMDObjective(cfg)
    nets = obj.build_networks(torch.device("cpu"))
    obj.attach(nets)
    gen = nets.trainable["generator"]
    opts = {p.name: torch.optim.AdamW(nets.trainable[p.name].parameters(), lr=2e-3, betas=p.betas)
            for p in obj.phases()}

    def distance():
        with torch.no_grad():
            ctx = obj.encode({"prompts": [PROMPTS[1]] * 64})
            noise = torch.randn(64, frames, C, H, W, generator=torch.Generator().manual_seed(5))
            x = self_forcing_rollout(gen, sch, obj.schedule, ctx, frames, latent_shape=(C, H, W), noise=noise,
                                     noise_fn=lambda like: torch.randn(like.shape)).latents
        m, s = channel_stats(x)
        return (m - t_mean).abs().mean().item(), (s - t_std).abs().mean().item()

    mean0, std0 = distance()
    data = obj.data(0, 1, seed=0)
    for step in range(300):
        for phase in obj.phases_at(step):
            loss, _ = obj.loss(phase, next(data), step)
            opts[phase].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(nets.trainable[phase].parameters(), 10.0)
            opts[phase].step()
    mean1, std1 = distance()
    report = (f"teacher mean {t_mean.tolist()} std {t_std.tolist()}; distance before {mean0 + std0:.3f} "
              f"(mean {mean0:.3f}, std {std0:.3f}), after {mean1 + std1:.3f} (mean {mean1:.3f}, std {std1:.3f})")
    assert mean1 + std1 < 0.5 * (mean0 + std0), report
    assert std1 < 0.8 * std0, report


# ----------------------------------------------------------------------------------------------------------------
# 5. shipped configs


@pytest.mark.parametrize("name, steps, first", [
    ("causal_forcing_dmd_framewise.yaml", [1000, 937.5, 833.33, 625], None),
    ("causal_forcing_dmd_chunkwise.yaml", [1000, 937.5, 833.33, 625], None),
    ("causal_forcing_dmd_framewise_2step.yaml", [1000, 833.33], [1000, 937.5, 833.33, 625]),
    ("causal_forcing_dmd_framewise_1step.yaml", [1000], [1000, 937.5, 833.33, 625]),
])
def test_shipped_dmd_configs_warp(configs_dir, name, steps, first):
    cfg = load_config(configs_dir / name)
    assert cfg.trainer == "score_distillation" and cfg.real_name == "Wan2.1-T2V-14B"
    obj = DMDObjective(cfg)
    assert obj.schedule.timesteps == pytest.approx(steps, abs=0.01)
    if first is None:
        assert obj.schedule.first_block is None
    else:
        assert obj.schedule.first_block == pytest.approx(first, abs=0.01)
    assert obj.phases_at(0) == ["generator", "critic"] and obj.phases_at(cfg.dfake_gen_update_ratio - 1) == ["critic"]
    expect_from = {4: [1000, 750, 500, 250], 2: [1000, 500], 1: [1000]}[len(steps)]
    for e, want in enumerate(expect_from):
        t_from, t_to = denoised_timestep_range(obj.scheduler, obj.schedule.timesteps, e)
        assert t_from == want and t_to == (expect_from[e + 1] if e + 1 < len(steps) else 0)
