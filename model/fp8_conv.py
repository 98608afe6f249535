"""fp8 convolutions for the Wan VAE decoder (``--fp8_vae``; accuracy and speed: docs/performance.md).

The residual blocks' 3x3x3 convolutions read e4m3 inputs and weights and accumulate in float32; the weights carry
one float32 scale per output channel (``amax / 448``), applied with the bias in the kernel's epilogue, which writes
bf16. Their inputs come straight from a norm and a SiLU, so they are cast to e4m3 with a unit scale (values beyond
±448, which a norm's output does not reach, saturate): the cast fuses into the compiled region that makes them, and
the decoder's causal cache of those inputs is held in e4m3 too.

On CUDA the product is one cuDNN graph per shape (``nvidia-cudnn-frontend``; Hopper and Ada have fp8 tensor cores).
Elsewhere :func:`fp8_conv3d` dequantises and convolves in float32: the same arithmetic up to summation order, slow,
the reference the GPU kernel is tested against."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from utils.errors import ConfigError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max   # 448
MIN_CAPABILITY = (8, 9)            # fp8 tensor cores: Ada (sm_89), Hopper (sm_90) and newer
INSTALL_HINT = "pip install nvidia-cudnn-frontend"


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` in e4m3 with a unit scale, saturating at ±448 (module docstring)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_conv_weight(weight: torch.Tensor, out_channels: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, C, *kernel]`` -> (e4m3 weights channels-last, float32 scales ``[1, K', 1, ...]``), ``weight ≈ w8 ·
    scale`` per output channel. ``out_channels``: ``K' >= K`` rows, the extra ones zero (a wider GEMM tile)."""
    k = weight.shape[0]
    out_channels = out_channels or k
    w = weight.detach().float()
    scale = w.flatten(1).abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    w8 = (w / scale.view(-1, *(1,) * (w.dim() - 1))).to(E4M3)
    if out_channels > k:
        w8 = torch.cat([w8, torch.zeros((out_channels - k, *w8.shape[1:]), dtype=E4M3, device=w8.device)])
        scale = torch.cat([scale, torch.ones(out_channels - k, device=scale.device)])
    memory = torch.channels_last_3d if w.dim() == 5 else torch.channels_last
    return w8.contiguous(memory_format=memory), scale.view(1, -1, *(1,) * (w.dim() - 2))


def check_fp8_conv_device(device: torch.device) -> None:
    """Raise ConfigError (``--fp8_vae``) unless ``device`` has fp8 tensor cores and the cuDNN frontend is installed."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        raise ConfigError(f"--fp8_vae: fp8 needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}."
                          f"{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell); {device} has none")
    try:
        importlib.import_module("cudnn")
    except ImportError as e:
        raise ConfigError(f"--fp8_vae needs cuDNN's Python frontend ({e}); install it with: {INSTALL_HINT}") from None


def _output_shape(x: torch.Tensor, weight: torch.Tensor, padding: list[int]) -> list[int]:
    spatial = [x.shape[2 + i] + 2 * padding[i] - weight.shape[2 + i] + 1 for i in range(x.dim() - 2)]
    return [x.shape[0], weight.shape[0], *spatial]


class _CudnnGraph:
    """``conv(x8, w8) · scale + bias`` for one set of shapes and strides, every plan cuDNN offers timed once, the
    fastest kept."""

    def __init__(self, cudnn, handle, x, weight, scale, bias, padding, out):
        f32 = cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=f32, compute_data_type=f32,
                          handle=handle)

        def tensor(name, t):
            return g.tensor(name=name, dim=list(t.shape), stride=list(t.stride()),
                            data_type=cudnn.data_type.FP8_E4M3 if t.dtype == E4M3 else f32)

        self.x, self.w, self.scale, self.bias = (tensor(n, t) for n, t in
                                                 (("x", x), ("w", weight), ("scale", scale), ("bias", bias)))
        spatial = x.dim() - 2
        y = g.conv_fprop(image=self.x, weight=self.w, padding=list(padding), stride=[1] * spatial,
                         dilation=[1] * spatial, compute_data_type=f32, name="conv")
        y = g.add(a=g.mul(a=y, b=self.scale, compute_data_type=f32, name="descale"), b=self.bias,
                  compute_data_type=f32, name="bias")
        y.set_output(True).set_data_type(cudnn.data_type.BFLOAT16).set_dim(list(out.shape)).set_stride(
            list(out.stride()))
        self.y, self.graph, self.handle = y, g, handle
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans(cudnn.build_plan_policy.ALL)
        self.workspace_size = max(g.get_workspace_size_plan_at_index(i) for i in range(g.get_execution_plan_count()))
        self.plan = self._fastest(x, weight, scale, bias, out)

    def __call__(self, x, weight, scale, bias, out, plan=None):
        workspace = torch.empty(self.workspace_size, device=x.device, dtype=torch.uint8)
        pack = {self.x: x, self.w: weight, self.scale: scale, self.bias: bias, self.y: out}
        self.graph.execute_plan_at_index(pack, workspace, self.plan if plan is None else plan, handle=self.handle)

    def _fastest(self, *args) -> int:
        times = {}
        for plan in range(self.graph.get_execution_plan_count()):
            try:
                self(*args, plan=plan)   # warm-up
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    self(*args, plan=plan)
                end.record()
                end.synchronize()
                times[plan] = start.elapsed_time(end)
            except Exception:   # a plan that fails to run is not a candidate
                continue
        if not times:
            raise RuntimeError("cuDNN built fp8 convolution plans but none of them ran")
        return min(times, key=times.get)


class _Graphs:
    """The process's cuDNN handles (per device) and graphs (per shapes and strides)."""

    def __init__(self):
        self.handles: dict[int, object] = {}
        self.graphs: dict[tuple, _CudnnGraph] = {}

    def run(self, x, weight, scale, bias, padding, out) -> None:
        cudnn = importlib.import_module("cudnn")
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if index not in self.handles:
            with torch.cuda.device(index):
                self.handles[index] = cudnn.create_handle()
        handle = self.handles[index]
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(x.device).cuda_stream)
        key = (index, *(tuple(t.shape) + tuple(t.stride()) for t in (x, weight, out)), tuple(padding))
        if key not in self.graphs:
            self.graphs[key] = _CudnnGraph(cudnn, handle, x, weight, scale, bias, padding, out)
        self.graphs[key](x, weight, scale, bias, out)


_GRAPHS = _Graphs()


@torch.library.custom_op("causal_forcing::fp8_conv", mutates_args=())
def fp8_conv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
             padding: list[int]) -> torch.Tensor:
    """``conv(x, weight) · scale + bias`` in bf16, stride 1: ``x`` and ``weight`` e4m3 channels-last, ``scale`` and
    ``bias`` float32 ``[1, K, 1, ...]`` (module docstring)."""
    memory = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    out = torch.empty(_output_shape(x, weight, padding), dtype=torch.bfloat16, device=x.device, memory_format=memory)
    if x.device.type == "cuda":
        _GRAPHS.run(x, weight, scale, bias, padding, out)
    else:   # the reference: dequantised operands, float32 products
        conv = F.conv3d if x.dim() == 5 else F.conv2d
        out.copy_(conv(x.float(), weight.float(), padding=padding) * scale + bias)
    return out


@fp8_conv.register_fake
def _(x, weight, scale, bias, padding):
    memory = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return torch.empty(_output_shape(x, weight, padding), dtype=torch.bfloat16, device=x.device, memory_format=memory)
