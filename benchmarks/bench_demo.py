"""Does the demo deliver frames as fast as the generator makes them? Generator FPS vs delivered FPS.

Starts the demo server (app/web/, uvicorn on 127.0.0.1, a free port) in this process with a full-size Wan2.1-1.3B causal
generator + full Wan VAE on random weights (speed does not depend on weight values; no download), and a WebSocket
client that starts a video and receives every frame. The text encoder is replaced by random ``[1, 512, 4096]``
embeddings (it runs once per prompt). For each mode it reports, median over ``--runs`` after a warm-up:

- ``standalone_fps``: the streaming pipeline alone (generation + VAE decode + host copy), as bench_inference.py;
- ``generator_fps``: the same generator inside the server (frames / time from request to last block decoded);
- ``delivered_fps``: frames received by the client / time from its start message to the last frame received;
- ``steady_generator_fps`` / ``steady_delivered_fps``: the same two rates after the first block (block k decoded ->
  block N decoded, vs block k's last frame received -> block N's), i.e. throughput without the start-up;
- ``first_frame_s`` (client), ``tail_lag_s`` (last frame received minus last block decoded), and the ratio
  ``delivered_fps / generator_fps`` (~1 means the server keeps up: delivery is not the bottleneck).

    python benchmarks/bench_demo.py --out bench_demo.json              # on a GPU
    python benchmarks/bench_demo.py --tiny --out /tmp/bench_demo.json  # CPU smoke test with tiny random models
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
import zlib

import torch
from common import save_results

from app.web.server import build_app
from app.web.session import DemoSettings, gpu_worker
from model.loader import build_wan_model
from model.scheduler import FlowMatchScheduler
from model.vae import WAN21_VAE_CONFIG, WanVAE
from pipeline.causal import StepSchedule
from pipeline.streaming import StreamingPipeline

MODES = {"chunk4": dict(n=3, steps=[1000, 750, 500, 250]), "frame4": dict(n=1, steps=[1000, 750, 500, 250])}


class RandomTextEncoder:
    """Stands in for UMT5: a fixed random embedding per prompt ``[B, text_len, text_dim]``."""

    def __init__(self, text_len: int, text_dim: int, device, dtype):
        self.shape, self.device, self.dtype = (text_len, text_dim), device, dtype

    def encode(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            out.append(torch.randn(self.shape, generator=g))
        return torch.stack(out).to(self.device, self.dtype)


def build(mode: dict, tiny: bool, vae: WanVAE, device, dtype) -> tuple[StreamingPipeline, DemoSettings]:
    from toy.folders import TINY_DIT

    preset = "tiny" if tiny else "wan2.1-t2v-1.3b"
    generator = build_wan_model(preset, causal=True, num_frame_per_block=mode["n"], dtype=dtype, device=device).eval()
    text_len, text_dim = (TINY_DIT.text_len, TINY_DIT.text_dim) if tiny else (512, 4096)
    latent_shape, (height, width) = ((16, 4, 6), (32, 48)) if tiny else ((16, 60, 104), (480, 832))
    sch = FlowMatchScheduler(shift=5.0)
    schedule = StepSchedule.from_config(sch, mode["steps"])
    pipe = StreamingPipeline(generator, RandomTextEncoder(text_len, text_dim, device, dtype), vae, sch, schedule,
                             latent_shape=latent_shape, default_num_frames=21, device=device, dtype=dtype)
    pipe.enable_fast_path()  # what demo.py serves by default (no-op on the CPU)
    settings = DemoSettings(fps=16, height=height, width=width, frames_per_block=mode["n"],
                            independent_first_frame=False, default_frames=21, max_frames=210,
                            schedules={len(mode["steps"]): schedule}, default_steps=len(mode["steps"]), window=21,
                            temporal_compression=vae.temporal_compression)
    return pipe, settings


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def standalone(pipe: StreamingPipeline, frames: int) -> float:
    """FPS of the pipeline alone, frames copied to the host as uint8 as the server does, on the server's GPU worker
    thread (cuDNN's tuned plans are per thread)."""

    def run():
        sync()
        start, n = time.perf_counter(), 0
        for chunk in pipe.open("benchmark", num_latent_frames=frames, seed=0, uint8=True):
            n += len(chunk.frames[0])
        return n / (time.perf_counter() - start)
    return gpu_worker().submit(run).result()


class Server:
    """The demo app under uvicorn on a background thread."""

    def __init__(self, app):
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws_per_message_deflate=False)
        self.server = uvicorn.Server(config)
        self.sock = config.bind_socket()
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the demo server did not start")
            time.sleep(0.05)
        self.url = "ws://127.0.0.1:%d/ws" % self.sock.getsockname()[1]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


async def client_run(url: str, frames: int, steps: int) -> dict:
    """One video through the WebSocket; times are taken as messages arrive."""
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello", hello
        sent = time.perf_counter()
        await ws.send(json.dumps(dict(type="start", prompt="benchmark", seed=0, steps=steps, frames=frames)))
        first = last = None
        received, blocks, block_done = 0, [], []   # block headers; arrival of each block's last frame
        while True:
            msg = await ws.recv()
            now = time.perf_counter()
            if isinstance(msg, bytes):
                received += 1
                first = first or now
                last = now
                if received == blocks[-1]["first_frame"] + blocks[-1]["frames"]:
                    block_done.append(now)
                continue
            m = json.loads(msg)
            if m["type"] in ("error", "busy"):
                raise RuntimeError(m["message"])
            if m["type"] == "block":
                blocks.append(m)
            if m["type"] == "done":
                break
    total = last - sent
    # steady state (after the first block): throughput of the generator vs of delivery, over the same blocks
    later = received - blocks[0]["frames"]
    steady_gen = later / (blocks[-1]["elapsed"] - blocks[0]["elapsed"]) if len(blocks) > 1 else float("nan")
    steady_del = later / (block_done[-1] - block_done[0]) if len(blocks) > 1 else float("nan")
    return dict(frames=received, generator_fps=m["gen_fps"], delivered_fps=received / total,
                steady_generator_fps=steady_gen, steady_delivered_fps=steady_del,
                first_frame_s=first - sent, server_first_frame_s=m["first_frame_s"],
                tail_lag_s=total - m["seconds"], seconds=total)


def measure(mode_name: str, args, vae, device, dtype) -> dict:
    mode = MODES[mode_name]
    pipe, settings = build(mode, args.tiny, vae, device, dtype)
    standalone(pipe, args.frames)  # warm-up (kernels, cuDNN plans, allocator)
    alone = statistics.median(standalone(pipe, args.frames) for _ in range(args.runs))
    server = Server(build_app(pipe, settings))
    try:
        asyncio.run(client_run(server.url, args.frames, len(mode["steps"])))  # warm-up through the server
        runs = [asyncio.run(client_run(server.url, args.frames, len(mode["steps"]))) for _ in range(args.runs)]
    finally:
        server.close()
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    row.update(mode=mode_name, standalone_fps=alone, latent_frames=args.frames,
               delivered_over_generator=row["delivered_fps"] / row["generator_fps"])
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="block modes to serve")
    p.add_argument("--frames", type=int, default=21, help="latent frames per video (21 -> 81 video frames)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--out", default="bench_demo.json", help="JSON output path")
    p.add_argument("--tiny", action="store_true", help="smoke test on the CPU with tiny random models")
    args = p.parse_args(argv)
    if args.tiny:
        from toy.folders import TINY_VAE
        device, dtype = torch.device("cpu"), torch.float32
        vae = WanVAE.from_config(**TINY_VAE)
    elif not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cudnn.benchmark = True
        vae = WanVAE.from_config(**WAN21_VAE_CONFIG).to(device, dtype).to_channels_last()
    rows = []
    for mode_name in args.modes:
        row = measure(mode_name, args, vae, device, dtype)
        rows.append(row)
        print(f"{mode_name:7s} standalone {row['standalone_fps']:6.1f} FPS | in server {row['generator_fps']:6.1f} FPS "
              f"| delivered {row['delivered_fps']:6.1f} FPS (x{row['delivered_over_generator']:.2f}) | steady: "
              f"generator {row['steady_generator_fps']:6.1f}, delivered {row['steady_delivered_fps']:6.1f} FPS | "
              f"first frame {row['first_frame_s']:.3f} s | tail lag {row['tail_lag_s'] * 1e3:.0f} ms", flush=True)
    save_results(args.out, rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
