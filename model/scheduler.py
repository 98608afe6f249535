"""Flow-matching noise schedule (model_and_inference.md §8, training.md §2.3): ``t`` on the 0..1000 scale,
``x_t = (1 - sigma) x0 + sigma noise`` with ``sigma = t / 1000`` after the shift, the network predicts the flow
``v = noise - x0``. Lookups use the NEAREST entry of the descending training grid, as the reference does (``t = 0``
is the smallest entry, sigma ~= 0.00498 for shift 5), as tensor ops: no GPU sync. Latents ``[B, F, C, H, W]``."""

from __future__ import annotations

import torch

from model.masks import BlockLayout


class FlowMatchScheduler:
    """Shifted grid of ``num_train_timesteps`` entries (also the scale: t = N sigma), shift ``s``:
    sigma <- s sigma / (1 + (s - 1) sigma)."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        sigmas64 = self._shifted_grid(num_train_timesteps, self.shift)
        self.sigmas = sigmas64.float()  # [N], descending
        self.timesteps = (sigmas64 * num_train_timesteps).float()  # [N], timesteps[0] == N
        self.weights = self._gaussian_weights(sigmas64 * num_train_timesteps).float()  # [N], mean 1
        self._tables_by_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @staticmethod
    def _shifted_grid(num_steps: int, shift: float) -> torch.Tensor:
        """Shifted sigmas of a ``num_steps`` grid, float64 ``[num_steps]``, descending: raw ``1 - i / num_steps``
        (the reference's ``N + 1`` values with the last, 0, dropped)."""
        raw = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        return shift * raw / (1 + (shift - 1) * raw)

    def _gaussian_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """exp(-2 ((t - N/2) / N)^2), shifted to a zero minimum and scaled to mean 1 over the grid."""
        n = self.num_train_timesteps
        y = torch.exp(-2 * ((timesteps - n / 2) / n) ** 2)
        y = y - y.min()
        return y * (len(timesteps) / y.sum())

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas + trailing 0, weights, timesteps + trailing 0) on ``device``, copied once per device."""
        device = torch.device(device)
        if device not in self._tables_by_device:
            zero = torch.zeros(1)
            tables = (self.timesteps, torch.cat([self.sigmas, zero]), self.weights, torch.cat([self.timesteps, zero]))
            self._tables_by_device[device] = tuple(tensor.to(device) for tensor in tables)
        return self._tables_by_device[device]

    def index_for(self, t: torch.Tensor) -> torch.Tensor:
        """int64 index of the nearest grid timestep, ``t``'s shape and device (ties go to the larger entry)."""
        t = torch.as_tensor(t)
        grid = self._tables(t.device)[0]
        return (grid - t.unsqueeze(-1)).abs().argmin(dim=-1)

    def sigma_for(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of the nearest grid entry; float32, ``t``'s shape and device."""
        t = torch.as_tensor(t)
        return self._tables(t.device)[1][self.index_for(t)]

    def training_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Loss weight of the nearest grid entry (0 at t = 1000, peak ~2.08 near t = 500); float32, t's shape."""
        t = torch.as_tensor(t)
        return self._tables(t.device)[2][self.index_for(t)]

    @staticmethod
    def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Reshape per-sample / per-frame values ``[B]`` or ``[B, F]`` to broadcast against ``like``."""
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) * x0 + sigma * noise`` (sigma by nearest lookup) in ``noise.dtype``; ``t`` is ``[B, F]``,
        ``[B]`` or a scalar, matching the leading dimensions of ``x0``."""
        sigma = self._expand(self.sigma_for(t), x0)
        return ((1 - sigma) * x0 + sigma * noise).to(noise.dtype)

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching target ``noise - x0`` (independent of t)."""
        return noise - x0

    def flow_to_x0(self, flow: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0 = x_t - sigma * flow``, computed in float64 and cast back to ``flow.dtype`` (as the reference)."""
        sigma = self._expand(self.sigma_for(t), x_t).double()
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def x0_to_flow(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``flow = (x_t - x0) / sigma``, computed in float64 and cast back to ``x0.dtype``."""
        sigma = self._expand(self.sigma_for(t), x_t).double()
        return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)

    def step(self, flow: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
             t_next: torch.Tensor | float | None = None) -> torch.Tensor:
        """One Euler step ``x + flow * (sigma_next - sigma)`` in ``x.dtype``: with ``t_next`` both sigmas exact
        (``t / N``: any grid); without it the reference's rule, the nearest grid entry's sigma and the next one's."""
        t = torch.as_tensor(t, device=x.device)
        if t_next is None:
            sigmas_ext = self._tables(t.device)[1]
            index = self.index_for(t)
            sigma, sigma_next = sigmas_ext[index], sigmas_ext[index + 1]
        else:
            t_next = torch.as_tensor(t_next, device=x.device)
            sigma = t.double() / self.num_train_timesteps
            sigma_next = t_next.double() / self.num_train_timesteps
        delta = self._expand((sigma_next - sigma).float(), x)
        return (x + flow * delta).to(x.dtype)

    def warp_steps(self, steps: list[int] | tuple[int, ...]) -> torch.Tensor:
        """Nominal steps ``s`` (e.g. [1000, 750, 500, 250]) -> grid timesteps ``T[N - s]`` (``T`` extended with a
        trailing 0, so ``s = 0`` maps to 0); float32 ``[len(steps)]``."""
        n = self.num_train_timesteps
        for s in steps:
            if int(s) != s or not 0 <= s <= n:
                raise ValueError(f"denoising steps must be integers in [0, {n}], got {list(steps)}")
        index = torch.tensor([n - int(s) for s in steps], dtype=torch.long)
        return self._tables(torch.device("cpu"))[3][index].clone()

    def inference_timesteps(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """Timesteps of a ``num_steps`` Euler grid built like the training grid (``shift`` default: this scheduler's);
        float32, descending, no trailing 0 (pass ``t_next=0`` to :meth:`step` for the last step)."""
        sigmas = self._shifted_grid(num_steps, self.shift if shift is None else float(shift))
        return (sigmas * self.num_train_timesteps).float()

    def sample_block_indices(self, batch_size: int, num_frames: int, num_frame_per_block: int = 1, low: int = 0,
                             high: int | None = None, uniform: bool = False, independent_first_frame: bool = False,
                             generator: torch.Generator | None = None,
                             device: torch.device | str | None = None) -> torch.Tensor:
        """Integers in ``[low, high)``, int64 ``[B, F]`` (training.md §2.4): one per sample (``uniform``) or one per
        block, constant within it. Draws ``[B, F]`` (``[B, 1]`` if uniform) as the reference does, so a seeded
        generator reproduces its draws."""
        high = self.num_train_timesteps if high is None else high
        if uniform:
            values = torch.randint(low, high, (batch_size, 1), generator=generator, device=device)
            return values.expand(batch_size, num_frames).clone()
        sizes = torch.tensor(BlockLayout(num_frame_per_block, independent_first_frame).block_sizes(num_frames))
        block_first = torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)   # each frame's block's first frame
        values = torch.randint(low, high, (batch_size, num_frames), generator=generator, device=device)
        return values[:, block_first.to(values.device)]

    def sample_training_timesteps(self, batch_size: int, num_frames: int, **kwargs) -> torch.Tensor:
        """Grid timesteps at indices from :meth:`sample_block_indices` (stage-1 diffusion loss); float32 ``[B, F]``."""
        index = self.sample_block_indices(batch_size, num_frames, **kwargs)
        return self._tables(index.device)[0][index]

    def sample_dmd_timesteps(self, batch_size: int, num_frames: int, low: int = 0, high: int | None = None,
                             shift: float | None = None, generator: torch.Generator | None = None,
                             device: torch.device | str | None = None) -> torch.Tensor:
        """DMD / critic timesteps (training.md §6.4 2a-2c), float32 ``[B, F]``, one value per sample: u ~ integers in
        ``[low, high)``, shifted ``t = N s u' / (1 + (s - 1) u')`` with ``u' = u / N`` when s > 1, clamped to
        ``[0.02 N, 0.98 N]``."""
        n = self.num_train_timesteps
        shift = self.shift if shift is None else float(shift)
        t = self.sample_block_indices(batch_size, num_frames, low=low, high=high, uniform=True, generator=generator,
                                      device=device).float()
        if shift > 1:
            frac = t / n
            t = shift * frac / (1 + (shift - 1) * frac) * n
        return t.clamp(0.02 * n, 0.98 * n)

