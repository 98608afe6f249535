"""Classifier-free guidance helpers (model/guidance.py) against float64 formulas and separate model passes."""

import pytest
import torch

from model.guidance import cond_uncond_context, guide
from model.wan import WanModel
from tests.tiny import TINY, rel

CFG = TINY


@pytest.fixture
def halves():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, 4, 4, generator=g), torch.randn(2, 3, 16, 4, 4, generator=g)


@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0])
def test_guide_is_uncond_plus_scale_times_difference(halves, scale):
    cond, uncond = halves
    expected = uncond.double() + scale * (cond.double() - uncond.double())
    assert rel(guide(cond, uncond, scale).double(), expected) < 1e-6   # float32 rounding only


@pytest.mark.parametrize("g", [0.5, 3.0])
def test_dmd_convention_is_guide_with_scale_plus_one(halves, g):
    """The DMD scores' ``cond + g·(cond − uncond)`` (the reference's form, float32 as it was computed) equals
    ``guide(cond, uncond, g + 1)``: algebraically identical, equal to float32 rounding (tolerance 1e-6 relative)."""
    cond, uncond = halves
    old = cond + g * (cond - uncond)
    assert rel(guide(cond, uncond, 1.0 + g), old) < 1e-6
    assert rel(old.double(), cond.double() + g * (cond.double() - uncond.double())) < 1e-6


@pytest.mark.parametrize("lc,ln,bn", [(5, 3, 1), (3, 5, 1), (4, 4, 2), (3, 6, 2)])
def test_cond_uncond_context_equals_separate_passes(lc, ln, bn):
    """One 2B pass over the padded batch gives the conditional and unconditional outputs of separate passes (the
    model zero-pads every context to text_len, so padding here changes nothing). Tolerance 1e-5 (float32)."""
    torch.manual_seed(0)
    model = WanModel(CFG, causal=False).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.1)
    g = torch.Generator().manual_seed(1)
    b = 2
    ctx = torch.randn(b, lc, CFG.text_dim, generator=g)
    neg = torch.randn(bn, ln, CFG.text_dim, generator=g)
    x = torch.randn(b, 2, 16, 4, 4, generator=g)
    t = torch.full((b, 2), 500.0)
    both = cond_uncond_context(ctx, neg)
    assert both.shape == (2 * b, max(lc, ln), CFG.text_dim)
    with torch.no_grad():
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        assert rel(cond, model(x, t, ctx)) < 1e-5
        assert rel(uncond, model(x, t, neg.expand(b, -1, -1))) < 1e-5
