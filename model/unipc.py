"""Wan2.1's flow-matching UniPC sampler: the multi-step solver of the published Stage-1 and bidirectional pipelines.

UniPC (Zhao et al., 2023, arXiv:2302.04867) as Wan2.1's ``FlowUniPCMultistepScheduler`` runs it (50 steps): data
prediction, ``B(h) = e^h - 1`` ("bh2"), order 2 with first-order first and last steps, a corrector before every
predictor but the first, final sigma 0. With ``x_σ = (1 - σ) x0 + σ ε`` and the flow ``v = ε - x0``, on
``α = 1 - σ``, ``σ`` and ``λ = log(α / σ)``:

* data prediction at step i: ``m_i = x_i - σ_i v_i``;
* predictor (UniP-p) from ``s = σ_i`` to ``t = σ_{i+1}``, ``h = λ_t - λ_s``:
  ``x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) m_i - α_t B(-h) ρ D`` with ``D = (m_{i-1} - m_i) / r``,
  ``r = (λ_{i-1} - λ_s) / h`` and ``ρ = 1/2`` at order 2 (UniPC's simplified order-2 predictor), no ``D`` at order 1;
* corrector (UniC-p) once ``m_{i+1}`` is known: the same update from the corrected ``x_s`` with one more term,
  ``ρ_c`` solving ``R ρ_c = b`` (``R_kj = r_j^{k-1}`` over the nodes ``(r, 1)``, ``b_k = k! (-h) φ_{k+1}(-h) / B``;
  ``ρ_c = 1/2`` at order 1). The corrected sample feeds the next predictor (the network saw the uncorrected one).

The last step (to σ = 0) is exactly ``m``. Coefficients are Python float64, tensors float32 or wider whatever the
network's dtype (Wan's copy works in the latents' dtype)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

SOLVER_ORDER = 2


def unipc_grid(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[list[float], list[float]]:
    """Wan's grid ``(timesteps the network sees, the solver's sigmas)``, descending, no final 0: raw sigmas
    ``linspace(σ_max, 0, N + 1)[:-1]`` (``σ_max = 1 - 1/T`` in float32, as Wan's table), shifted; the network sees
    ``floor(T σ)`` (Wan's int64 cast), the solver the exact sigmas. 50 steps, shift 5: 999, 995, ..., 172, 92."""
    top = float(torch.tensor(1 - 1 / num_train_timesteps, dtype=torch.float32))
    raw = [top * (1 - i / num_steps) for i in range(num_steps)]
    sigmas = [shift * s / (1 + (shift - 1) * s) for s in raw]
    return [float(math.floor(num_train_timesteps * s)) for s in sigmas], sigmas


def _lambda(sigma: float) -> float:
    """log-SNR ``log(α / σ)``; +inf at σ = 0."""
    return math.inf if sigma == 0 else math.log((1 - sigma) / sigma)


class UniPCSolver:
    """One sampling run (a block, or a bidirectional video) over ``sigmas`` (descending, in (0, 1), the final 0
    appended here): call :meth:`step` once per sigma."""

    def __init__(self, sigmas: Sequence[float]):
        if not sigmas or any(not 0 < s < 1 for s in sigmas):   # λ is -inf at σ = 1 (why Wan starts at 0.999)
            raise ValueError(f"UniPC sigmas must be non-empty and lie in (0, 1), got {list(sigmas)}")
        self.sigmas = [float(s) for s in sigmas] + [0.0]
        self.index = 0
        self._x0: list[torch.Tensor] = []      # data predictions of the last SOLVER_ORDER steps, oldest first
        self._sample: torch.Tensor | None = None   # the (corrected) sample the last predictor started from
        self._order = 0                          # order of the last predictor = order of the next corrector

    def step(self, flow: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Given the flow ``v`` predicted at the current sample ``x`` (noise level ``sigmas[index]``), return the sample
        at the next level (the clean sample after the last step), in ``x``'s dtype."""
        i = self.index
        if i >= len(self.sigmas) - 1:
            raise RuntimeError(f"UniPC run of {len(self.sigmas) - 1} steps is already finished")
        work = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(work)
        m = xs - self.sigmas[i] * flow.to(work)
        if self._sample is not None:   # UniC: correct x with the data prediction made at x itself
            xs = self._correct(m)
        self._x0 = (self._x0 + [m])[-SOLVER_ORDER:]
        remaining = len(self.sigmas) - 1 - i
        self._order = min(SOLVER_ORDER, remaining, i + 1)   # warm-up from order 1; lower order at the end
        self._sample = xs
        self.index += 1
        return self._predict(xs).to(x.dtype)

    @staticmethod
    def _coefficients(s: float, t: float) -> tuple[float, float, float]:
        """``(σ_t / σ_s, α_t (e^{-h} - 1), h)`` for a step from sigma ``s`` to ``t > 0``. With bh2,
        ``α_t B(-h)`` is the same number as ``α_t (e^{-h} - 1)``."""
        h = _lambda(t) - _lambda(s)
        return t / s, (1 - t) * math.expm1(-h), h

    def _predict(self, xs: torch.Tensor) -> torch.Tensor:
        i = self.index - 1
        s, t = self.sigmas[i], self.sigmas[i + 1]
        m = self._x0[-1]
        if t == 0:                       # e^{-h} = 0: the update is the data prediction itself
            return m
        ratio, c, h = self._coefficients(s, t)
        out = ratio * xs - c * m
        if self._order == 2:
            r = (_lambda(self.sigmas[i - 1]) - _lambda(s)) / h
            out = out - c * 0.5 * (self._x0[-2] - m) / r
        return out

    def _correct(self, m_new: torch.Tensor) -> torch.Tensor:
        """UniC of order ``self._order`` for the step just taken, from ``sigmas[index-1]`` to ``sigmas[index]``."""
        i = self.index
        s, t = self.sigmas[i - 1], self.sigmas[i]
        m = self._x0[-1]
        ratio, c, h = self._coefficients(s, t)
        out = ratio * self._sample - c * m
        if self._order == 1:
            return out - c * 0.5 * (m_new - m)
        hh = -h
        b_h = math.expm1(hh)
        phi2 = (math.expm1(hh) / hh - 1) / hh          # φ_2(hh): (φ_1 - 1) / hh
        phi3 = (phi2 - 0.5) / hh                         # φ_3(hh): (φ_2 - 1/2) / hh
        b1, b2 = hh * phi2 / b_h, 2 * hh * phi3 / b_h
        r = (_lambda(self.sigmas[i - 2]) - _lambda(s)) / h
        rho_d = (b1 - b2) / (1 - r)                      # R = [[1, 1], [r, 1]] over the nodes (r, 1)
        rho_new = b1 - rho_d
        return out - c * (rho_d * (self._x0[-2] - m) / r + rho_new * (m_new - m))
