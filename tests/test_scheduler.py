"""FlowMatchScheduler against float64 formulas written out here and the numbers of spec §8 / training.md §2.3.

Tolerances: grid, weights and warped lists 1e-6 relative (float32 tables vs float64 formulas); conversions
1e-6 (float64 inside); Euler integration of a constant flow 1e-5 (float32 accumulation over 48 steps).
"""

import math

import pytest
import torch

from model.scheduler import FlowMatchScheduler

N = 1000


def shifted_t(raw_sigma: float, shift: float) -> float:
    """Timestep of a raw (pre-shift) sigma, float64."""
    return N * shift * raw_sigma / (1 + (shift - 1) * raw_sigma)


def reference_grid(num_steps: int = N, shift: float = 5.0) -> torch.Tensor:
    return torch.tensor([shifted_t(1 - i / num_steps, shift) for i in range(num_steps)], dtype=torch.float64)


@pytest.fixture(scope="module")
def sched():
    return FlowMatchScheduler(num_train_timesteps=N, shift=5.0)


def test_grid_matches_formula(sched):
    expected = reference_grid()
    assert sched.timesteps.dtype == torch.float32 and sched.timesteps.shape == (N,)
    torch.testing.assert_close(sched.timesteps.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.sigmas.double(), expected / N, rtol=1e-6, atol=0)


def test_spec_numbers(sched):
    t = sched.timesteps
    assert t[0].item() == 1000.0
    assert abs(t[1].item() - 999.80) < 5e-3 and abs(t[2].item() - 999.60) < 5e-3
    assert [round(v, 2) for v in t[-3:].tolist()] == [14.82, 9.92, 4.98]
    assert abs(sched.sigmas[-1].item() - 0.00498) < 1e-5


def test_training_weight_formula(sched):
    t = reference_grid()
    y = torch.exp(-2 * ((t - N / 2) / N) ** 2)
    expected = (y - y.min()) / (y - y.min()).sum() * N
    torch.testing.assert_close(sched.weights.double(), expected, rtol=1e-6, atol=1e-7)
    assert sched.training_weight(torch.tensor(1000.0)).item() == 0.0
    assert abs(sched.weights.mean().item() - 1.0) < 1e-5
    peak = sched.weights.argmax()
    assert abs(sched.weights[peak].item() - 2.076) < 1e-3
    assert abs(sched.timesteps[peak].item() - 500) < 2


@pytest.mark.parametrize(
    "shift, steps, spec_values",
    [
        (5.0, [1000, 750, 500, 250], [1000.0, 937.5, 833.3333, 625.0]),
        (5.0, [1000, 500], [1000.0, 833.3333]),
        (5.0, [1000], [1000.0]),
        (8.0, [1000, 750, 500, 250], [1000.0, 960.0, 888.8889, 727.2727]),
    ],
)
def test_warp_steps(shift, steps, spec_values):
    warped = FlowMatchScheduler(shift=shift).warp_steps(steps)
    # index 1000 - s of the grid has raw sigma s / 1000
    expected = torch.tensor([shifted_t(s / N, shift) for s in steps], dtype=torch.float64)
    torch.testing.assert_close(warped.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(warped, torch.tensor(spec_values), rtol=0, atol=1e-4)


def test_warp_steps_zero_and_invalid(sched):
    assert sched.warp_steps([0]).tolist() == [0.0]
    for bad in ([1001], [-1], [2.5]):
        with pytest.raises(ValueError):
            sched.warp_steps(bad)


def test_inference_grid_48_matches_warped_list(sched):
    grid = sched.inference_timesteps(48)
    torch.testing.assert_close(grid.double(), reference_grid(48), rtol=1e-6, atol=0)
    torch.testing.assert_close(grid[[0, 12, 24, 36]], sched.warp_steps([1000, 750, 500, 250]), rtol=1e-6, atol=0)
    assert abs(grid[-1].item() - 96.15) < 5e-3  # T_47 of the consistency-distillation grid
    torch.testing.assert_close(
        sched.inference_timesteps(10, shift=3.0).double(), reference_grid(10, 3.0), rtol=1e-6, atol=0
    )


def test_nearest_lookup(sched):
    grid = sched.timesteps.tolist()
    queries = torch.tensor([[1000.0, 999.9, 0.0], [500.0, 4.0, 2000.0]])
    expected = [[min(range(N), key=lambda i: abs(grid[i] - q)) for q in row] for row in queries.tolist()]
    assert sched.index_for(queries).tolist() == expected
    assert sched.index_for(queries)[0, 2].item() == N - 1  # t = 0 -> smallest grid entry
    torch.testing.assert_close(sched.sigma_for(queries), sched.sigmas[torch.tensor(expected)])
    # exact grid entries map to themselves; integer and bf16 inputs work
    assert sched.index_for(sched.timesteps).tolist() == list(range(N))
    assert sched.index_for(torch.tensor([1000, 625])).tolist() == [0, grid.index(625.0)]
    assert sched.sigma_for(torch.tensor([1000.0], dtype=torch.bfloat16)).dtype == torch.float32
    assert sched.sigma_for(torch.tensor(1000.0)).shape == ()


def test_add_noise_per_frame_broadcast(sched):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 5, 6, generator=gen), torch.randn(2, 3, 4, 5, 6, generator=gen)
    t = torch.tensor([[1000.0, 500.0, 20.0], [937.5, 0.0, 250.0]])
    out = sched.add_noise(x0, noise, t)
    for b in range(2):
        for f in range(3):
            s = sched.sigmas[sched.index_for(t[b, f])].item()
            torch.testing.assert_close(out[b, f], (1 - s) * x0[b, f] + s * noise[b, f])
    per_sample = sched.add_noise(x0, noise, t[:, 0])
    torch.testing.assert_close(per_sample, sched.add_noise(x0, noise, t[:, :1].expand(2, 3)))
    torch.testing.assert_close(sched.add_noise(x0, noise, torch.tensor([1000.0, 1000.0])), noise)
    assert sched.add_noise(x0, noise.bfloat16(), t).dtype == torch.bfloat16


def test_x0_flow_roundtrip(sched):
    gen = torch.Generator().manual_seed(1)
    x_t, flow = torch.randn(2, 3, 4, 5, 6, generator=gen), torch.randn(2, 3, 4, 5, 6, generator=gen)
    t = torch.tensor([[1000.0, 833.3333, 20.0], [500.0, 5.0, 999.0]])
    x0 = sched.flow_to_x0(flow, x_t, t)
    sigma = sched.sigma_for(t).double()[..., None, None, None]
    torch.testing.assert_close(x0.double(), x_t.double() - sigma * flow.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sched.x0_to_flow(x0, x_t, t), flow, rtol=1e-4, atol=1e-4)
    x0_64 = sched.flow_to_x0(flow.double(), x_t.double(), t)
    torch.testing.assert_close(sched.x0_to_flow(x0_64, x_t.double(), t), flow.double(), rtol=1e-10, atol=1e-10)
    assert sched.flow_to_x0(flow.bfloat16(), x_t, t).dtype == torch.bfloat16
    torch.testing.assert_close(sched.training_target(x0, x_t), x_t - x0)


def test_step(sched):
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(1, 2, 3, 4, 4, generator=gen), torch.randn(1, 2, 3, 4, 4, generator=gen)
    t = torch.tensor([[1000.0, 937.5]])
    # explicit t_next: exact sigmas
    out = sched.step(v, t, x, t_next=torch.tensor([[937.5, 0.0]]))
    torch.testing.assert_close(out[0, 0], x[0, 0] + v[0, 0] * (937.5 - 1000) / N)
    torch.testing.assert_close(out[0, 1], x[0, 1] + v[0, 1] * (0 - 937.5) / N)
    # default: next training-grid entry, 0 after the last
    idx = sched.index_for(t)[0]
    out = sched.step(v, t, x)
    for f in range(2):
        delta = sched.sigmas[idx[f] + 1] - sched.sigmas[idx[f]]
        torch.testing.assert_close(out[0, f], x[0, f] + v[0, f] * delta)
    last = sched.step(v, sched.timesteps[-1], x)
    torch.testing.assert_close(last, x - v * sched.sigmas[-1])


def test_euler_sampler_recovers_x0_for_a_straight_flow(sched):
    """With the exact flow noise - x0, Euler over any grid ending at 0 lands on x0."""
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 2, 3, 4, 4, generator=gen), torch.randn(1, 2, 3, 4, 4, generator=gen)
    grid = torch.cat([sched.inference_timesteps(48), torch.zeros(1)])
    x = noise.clone()
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = sched.step(noise - x0, t, x, t_next=t_next)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


def test_block_sampler(sched):
    gen = torch.Generator().manual_seed(4)
    idx = sched.sample_block_indices(4, 6, num_frame_per_block=3, low=10, high=20, generator=gen)
    assert idx.shape == (4, 6) and idx.dtype == torch.int64
    assert idx.min() >= 10 and idx.max() < 20
    assert (idx[:, :3] == idx[:, :1]).all() and (idx[:, 3:] == idx[:, 3:4]).all()
    # reproduces the reference draw: one [B, F] randint, each block takes its first frame's value
    raw = torch.randint(10, 20, (4, 6), generator=torch.Generator().manual_seed(4))
    assert torch.equal(idx, raw[:, [0, 0, 0, 3, 3, 3]])

    uni = sched.sample_block_indices(3, 5, uniform=True, generator=gen)
    assert (uni == uni[:, :1]).all()
    first = sched.sample_block_indices(
        2, 7, num_frame_per_block=3, independent_first_frame=True, generator=torch.Generator().manual_seed(5)
    )
    raw = torch.randint(0, N, (2, 7), generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, raw[:, [0, 1, 1, 1, 4, 4, 4]])
    with pytest.raises(ValueError):
        sched.sample_block_indices(1, 7, num_frame_per_block=3)
    ts = sched.sample_training_timesteps(2, 4, num_frame_per_block=2, generator=gen)
    assert ts.dtype == torch.float32 and torch.isin(ts, sched.timesteps).all()


def test_dmd_sampler(sched):
    t = sched.sample_dmd_timesteps(64, 3, generator=torch.Generator().manual_seed(6))
    u = torch.randint(0, N, (64, 1), generator=torch.Generator().manual_seed(6)).double()
    expected = torch.tensor([min(max(shifted_t(v / N, 5.0), 20.0), 980.0) for v in u[:, 0].tolist()])
    assert t.shape == (64, 3) and (t == t[:, :1]).all()
    torch.testing.assert_close(t[:, 0], expected.float(), rtol=1e-6, atol=1e-4)
    assert t.min() >= 20 and t.max() <= 980
    gen = torch.Generator().manual_seed(7)
    unshifted = sched.sample_dmd_timesteps(8, 1, low=20, high=980, shift=1.0, generator=gen)   # inside the clamp
    assert torch.equal(unshifted, torch.randint(20, 980, (8, 1), generator=torch.Generator().manual_seed(7)).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_lookups_do_not_sync_on_gpu(sched):
    x = torch.randn(1, 3, 4, 8, 8, device="cuda")
    t = torch.tensor([[1000.0, 500.0, 3.0]], device="cuda")
    sched.add_noise(x, x, t)  # first use copies the tables to the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        sched.sigma_for(t)
        sched.add_noise(x, x, t)
        sched.flow_to_x0(x, x, t)
        sched.step(x, t, x)
        sched.step(x, t, x, t_next=t * 0.5)
        sched.training_weight(t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(sched.add_noise(x, x, t).sum().item())
