"""The bidirectional sampler against a plain float64 Euler loop written here (tiny model)."""

import torch

from model.scheduler import FlowMatchScheduler
from model.wan import WanModel
from pipeline.causal import StepSchedule
from toy.bidirectional import sample_bidirectional
from toy.folders import TINY_DIT


@torch.no_grad()
def test_euler_cfg_sampler_matches_manual_loop():
    torch.manual_seed(0)
    model = WanModel(TINY_DIT, causal=False).eval()
    model.head.head.weight.normal_(std=0.1)
    sch = FlowMatchScheduler(shift=5.0)
    ts = sch.inference_timesteps(6).tolist()
    noise = torch.randn(1, 3, 16, 4, 4)
    ctx, neg = torch.randn(1, 5, TINY_DIT.text_dim), torch.randn(1, 7, TINY_DIT.text_dim)
    out = sample_bidirectional(model, sch, noise, ctx, StepSchedule(ts, rule="euler"), negative=neg, guidance_scale=4.0)
    x = noise.double()
    for j, t in enumerate(ts):
        tt = torch.full((1,), t)
        c, u = model(x.float(), tt, ctx).double(), model(x.float(), tt, neg).double()
        sigma, sigma_next = t / 1000, (ts[j + 1] if j + 1 < len(ts) else 0.0) / 1000
        x = x + (u + 4.0 * (c - u)) * (sigma_next - sigma)
    assert ((out.double() - x).abs().max() / x.abs().max()) < 1e-5
