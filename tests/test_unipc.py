"""Wan's flow UniPC (model/unipc.py): the grid against the published one, the solver against a float64 recomputation
written here from the UniPC paper's equations and against diffusers' UniPC run on the same grid, convergence to the
exact solution of a Gaussian toy problem, and its use in the causal block loop and the bidirectional sampler."""

import math

import numpy as np
import pytest
import torch

from model.kv_cache import KVCache
from model.scheduler import FlowMatchScheduler
from model.unipc import UniPCSolver, unipc_grid
from model.wan import WanModel
from pipeline.causal import BlockLoop, Guidance, StepSchedule
from toy.bidirectional import sample_bidirectional
from toy.folders import TINY_DIT

# The timesteps the published Stage-1 pipeline gives the network: FlowUniPCMultistepScheduler(shift=1) with
# set_timesteps(50, shift=5.0), as printed by the published code.
PUBLISHED_50 = [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890,
                882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584,
                555, 522, 487, 448, 405, 356, 302, 241, 172, 92]

# ------------------------------------------------------------------------------------------------ references


def unipc_reference(sigmas, velocity, x, order=2):
    """UniPC-bh2 with data prediction (Zhao et al. 2023, Alg. for x0-prediction, B(h) = e^h - 1), general order,
    numpy float64. ``sigmas`` descending without the final 0; ``velocity(x, sigma)`` is the flow field.

    Written from the equations: for a step s -> t with h = λ_t - λ_s (λ = log(α/σ), α = 1 - σ) and z = -h,
      x_t = (σ_t/σ_s) x_s - α_t (e^z - 1) m_s - α_t B Σ_m a_m D_m,   D_m = (m_m - m_s) / r_m,  B = e^z - 1,
    where the a_m solve Σ_m a_m r_m^(k-1) = k! z φ_{k+1}(z) / B (k = 1..p) over the nodes r_m = (λ_m - λ_s)/h;
    φ_1(z) = (e^z - 1)/z, φ_{k+1}(z) = (φ_k(z) - 1/k!)/z. The predictor uses the p - 1 previous points, the
    corrector those plus the new point (r = 1). Wan/UniPC take a = 1/2 for the order-2 predictor and the order-1
    corrector. Orders ramp up from 1 and the last step is first order; the last step (σ = 0) returns m.
    """
    lam = lambda s: math.inf if s == 0 else math.log((1 - s) / s)   # noqa: E731
    sig = list(sigmas) + [0.0]
    n = len(sigmas)

    def phi(k, z):
        value = math.expm1(z) / z
        for j in range(1, k):
            value = (value - 1 / math.factorial(j)) / z
        return value

    def update(x_s, i_s, i_t, ms, nodes_m, new_m=None, p=1):
        """The UniP (new_m None) or UniC update from sigma index i_s to i_t; ``nodes_m`` previous (index, m)."""
        s, t = sig[i_s], sig[i_t]
        if t == 0:
            return ms
        h = lam(t) - lam(s)
        z = -h
        b_h = math.expm1(z)
        base = t / s * x_s - (1 - t) * math.expm1(z) * ms
        rs = [(lam(sig[j]) - lam(s)) / h for j, _ in nodes_m]
        ds = [(m - ms) / r for (_, m), r in zip(nodes_m, rs)]
        if new_m is not None:
            rs, ds = rs + [1.0], ds + [new_m - ms]
        if not ds:
            return base
        if (new_m is None and len(ds) == 1) or (new_m is not None and p == 1):
            a = np.array([0.5])
        else:
            g = np.array([math.factorial(k) * z * phi(k + 1, z) / b_h for k in range(1, len(rs) + 1)])
            a = np.linalg.solve(np.array([[r ** (k - 1) for r in rs] for k in range(1, len(rs) + 1)]), g)
        return base - (1 - t) * b_h * sum(ak * d for ak, d in zip(a, ds))

    ms_hist, x_prev, p_prev = [], None, 0
    for i in range(n):
        m = x - sig[i] * velocity(x, sig[i])
        if i > 0:   # corrector for the step i-1 -> i, of the order that step's predictor had
            nodes = [(i - 1 - k, ms_hist[-1 - k]) for k in range(1, p_prev)]
            x = update(x_prev, i - 1, i, ms_hist[-1], nodes, new_m=m, p=p_prev)
        ms_hist.append(m)
        p_prev = min(order, n - i, i + 1)
        nodes = [(i - k, ms_hist[-1 - k]) for k in range(1, p_prev)]
        x_prev, x = x, update(x, i, i + 1, m, nodes)
    return x


MU, SD = np.array([0.7, -1.2, 0.1, 2.0]), np.array([0.5, 0.8, 1.3, 1.0])


def gaussian_velocity(x, sigma):
    """Exact flow of x_σ = (1-σ) x0 + σ ε with x0 ~ N(MU, SD²): v = (x - E[x0 | x_σ]) / σ."""
    a = 1 - sigma
    x0 = MU + a * SD**2 / (a**2 * SD**2 + sigma**2) * (x - a * MU)
    return (x - x0) / sigma


def gaussian_exact(x, sigma):
    """Where the probability-flow ODE takes x (at noise level sigma) at σ = 0: the standardised value is kept."""
    a = 1 - sigma
    return MU + SD * (x - a * MU) / np.sqrt(a**2 * SD**2 + sigma**2)


def run_solver(sigmas, x, dtype=torch.float64):
    solver, xt = UniPCSolver(sigmas), torch.tensor(x, dtype=dtype)
    for s in sigmas:
        xt = solver.step(torch.tensor(gaussian_velocity(xt.double().numpy(), s), dtype=dtype), xt)
    return xt.double().numpy()


# ------------------------------------------------------------------------------------------------ grid and solver


def test_grid_is_the_published_one():
    timesteps, sigmas = unipc_grid(50, 5.0)
    assert [int(t) for t in timesteps] == PUBLISHED_50
    raw = np.linspace(float(np.float32(1 - 1 / 1000)), 0, 51)[:-1]          # Wan: float32 σ_max, then shift 5
    np.testing.assert_allclose(sigmas, 5 * raw / (1 + 4 * raw), rtol=1e-12)
    assert all(t <= 1000 * s < t + 1 for t, s in zip(timesteps, sigmas))   # the network sees floor(1000 σ)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 50])
def test_solver_equals_the_float64_reference(num_steps):
    """Same toy problem, same grid: the library (float64 tensors) and the reference agree to rounding; in float32
    to float32 precision."""
    _, sigmas = unipc_grid(num_steps, 5.0)
    x = np.random.default_rng(0).standard_normal((3, 4))
    want = unipc_reference(sigmas, gaussian_velocity, x)
    np.testing.assert_allclose(run_solver(sigmas, x), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(run_solver(sigmas, x, torch.float32), want, rtol=0, atol=2e-5)


def test_solver_equals_diffusers_unipc_on_the_same_grid():
    """diffusers' UniPCMultistepScheduler (flow sigmas, order 2, bh2, lower_order_final) given Wan's raw grid is
    a third implementation of the same solver (its default grid, σ_max = 1, gives other timesteps: 96 where Wan
    has 92, hence our own grid). Agreement to its float32 sigmas."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                              use_flow_sigmas=True, flow_shift=5.0, solver_order=2,
                                              solver_type="bh2", lower_order_final=True)
    sched.set_timesteps(sigmas=np.linspace(float(np.float32(1 - 1 / 1000)), 0, 51)[:-1])
    timesteps, sigmas = unipc_grid(50, 5.0)
    assert sched.timesteps.tolist() == [int(t) for t in timesteps]
    x = torch.tensor(np.random.default_rng(1).standard_normal((2, 4)))
    y = x.clone()
    ours = UniPCSolver(sigmas)
    for t, s in zip(sched.timesteps, sched.sigmas[:-1].tolist()):
        x = sched.step(torch.tensor(gaussian_velocity(x.numpy(), s)), t, x, return_dict=False)[0]
    for s in sigmas:
        y = ours.step(torch.tensor(gaussian_velocity(y.numpy(), s)), y)
    assert (x - y).abs().max() < 1e-5


def test_converges_to_the_exact_solution_faster_than_euler():
    """Gaussian data: the exact ODE endpoint is known. Euler on the same sigmas is first order (4x the steps, 4x
    smaller error); UniPC's error falls faster (> 6x; the huge first step out of σ = 0.9998, taken at first order,
    keeps it from the asymptotic third order) and at 50 steps is more than 5x below Euler's."""
    x = np.random.default_rng(2).standard_normal((64, 4))

    def errors(num_steps):
        _, sigmas = unipc_grid(num_steps, 5.0)
        exact = gaussian_exact(x, sigmas[0])
        euler = x.copy()
        for s, s_next in zip(sigmas, sigmas[1:] + [0.0]):
            euler = euler + (s_next - s) * gaussian_velocity(euler, s)
        return np.abs(run_solver(sigmas, x) - exact).max(), np.abs(euler - exact).max()

    (e50, euler50), (e200, euler200) = errors(50), errors(200)
    assert 3.5 < euler50 / euler200 < 4.5, (euler50, euler200)
    assert e50 / e200 > 6, (e50, e200)
    assert e50 < euler50 / 5, (e50, euler50)


def test_solver_refuses_extra_steps_and_bad_sigmas():
    solver = UniPCSolver([0.5])
    x = torch.zeros(2)
    assert torch.equal(solver.step(torch.ones(2), x), -0.5 * torch.ones(2))      # σ = 0 after one step: x - σ v
    with pytest.raises(RuntimeError, match="finished"):
        solver.step(torch.ones(2), x)
    for bad in ([1.5, 0.5], [1.0, 0.5], []):
        with pytest.raises(ValueError, match="sigmas must be non-empty and lie in \\(0, 1\\)"):
            UniPCSolver(bad)


# ------------------------------------------------------------------------------------------------ in the samplers


def tiny(causal, n=1):
    torch.manual_seed(0)
    model = WanModel(TINY_DIT, causal=causal, num_frame_per_block=n).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.1)
    return model


@torch.no_grad()
def test_block_loop_runs_a_fresh_unipc_per_block_with_cfg():
    """The causal loop with rule "unipc" equals, block by block, a solver run written here against the full causal
    forward (the block's frames appended to the clean previous blocks, guidance as two separate passes)."""
    n, frames, steps, scale = 2, 4, 6, 3.0
    model, sch = tiny(True, n), FlowMatchScheduler(shift=5.0)
    schedule = StepSchedule.multistep(sch, steps, 5.0, "unipc")
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, frames, 16, 4, 6, generator=g)
    ctx, neg = torch.randn(1, 5, TINY_DIT.text_dim, generator=g), torch.randn(1, 7, TINY_DIT.text_dim, generator=g)
    cache = KVCache.for_model(model, 2, 4, 6, capacity_frames=frames)
    out = torch.cat([x for _, x in BlockLoop(model, sch, schedule, Guidance(ctx, neg, scale), cache).run(noise)], 1)
    done = torch.zeros(1, 0, 16, 4, 6)
    for b in range(frames // n):
        x, solver = noise[:, b * n:(b + 1) * n], UniPCSolver(schedule.sigmas)
        for t in schedule.timesteps:
            t_all = torch.cat([torch.zeros(1, done.shape[1]), torch.full((1, n), t)], 1)
            c = model(torch.cat([done, x], 1), t_all, ctx)[:, -n:]
            u = model(torch.cat([done, x], 1), t_all, neg)[:, -n:]
            x = solver.step(u + scale * (c - u), x)
        done = torch.cat([done, x], 1)
    assert ((out - done).abs().max() / done.abs().max()) < 1e-4


@torch.no_grad()
def test_bidirectional_unipc_equals_a_manual_solver_run():
    model, sch = tiny(False), FlowMatchScheduler(shift=5.0)
    schedule = StepSchedule.multistep(sch, 5, 5.0, "unipc")
    noise = torch.randn(1, 3, 16, 4, 4)
    ctx, neg = torch.randn(1, 5, TINY_DIT.text_dim), torch.randn(1, 7, TINY_DIT.text_dim)
    out = sample_bidirectional(model, sch, noise, ctx, schedule, negative=neg, guidance_scale=4.0)
    x, solver = noise, UniPCSolver(schedule.sigmas)
    for t in schedule.timesteps:
        tt = torch.full((1, 3), t)
        c, u = model(x, tt, ctx), model(x, tt, neg)
        x = solver.step(u + 4.0 * (c - u), x)
    assert ((out - x).abs().max() / x.abs().max()) < 1e-5
