r"""Interactive real-time demo: a local web page that plays the video while it is generated, with prompt switching.

    python demo.py                                  # the shipped toy model, on the CPU
    python demo.py --config_path configs/causal_forcing_dmd_chunkwise.yaml \
        --checkpoint_path checkpoints/chunkwise/causal_forcing.pt [--use_ema]     # the full model, on a GPU

then open the printed URL. Config handling (``--override``, ``--local_attn_size``, ``--sink_size``,
``--text_encoder_cpu``, ``--device``) is the same as ``inference.py``'s. The server binds to 127.0.0.1 unless
``--host`` says otherwise, runs one generation at a time and queues up to ``--max_queue`` further clients.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from app.cli import add_model_flags
from utils.errors import UserError

TOY_CONFIG = "configs/toy/causal_forcing_dmd_chunkwise.yaml"
ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, config_required=False, config_help=f"stage YAML, as for inference.py (default: the toy "
                                                          f"model, {TOY_CONFIG}, on the CPU)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (0.0.0.0 exposes the demo to your network); requests must be addressed to it, "
                        "127.0.0.1, localhost or [::1] (with 0.0.0.0: any IP address), other host names are refused")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free port)")
    p.add_argument("--max_frames", type=int, default=None, help="longest video a client may ask for, in latent "
                                                                "frames (default: 10x the training length)")
    p.add_argument("--max_queue", type=int, default=2, help="clients that may wait while the GPU is busy")
    return p.parse_args(argv)


def load_pipeline(args):
    """(pipeline, config, description) for ``args``, built as inference.py builds them."""
    import torch

    from app.cli import config_from_args, pipeline_from_args

    toy = args.config_path is None
    if toy:
        args.config_path = os.path.join(ROOT, TOY_CONFIG)
        if not os.path.isfile(args.config_path):
            raise UserError(f"the toy model's config {TOY_CONFIG} is missing: pass --config_path and "
                            "--checkpoint_path for a full model")
    cfg = config_from_args(args)
    pipe = pipeline_from_args(args, cfg, device=args.device or ("cpu" if toy else None))
    where = torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else "CPU"
    info = dict(config=TOY_CONFIG if toy else os.path.basename(args.config_path), device=where)  # shown to clients
    return pipe, cfg, info


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        import uvicorn

        from app.web.server import LOOPBACK_HOSTS, build_app
        from app.web.session import settings_for

        if args.max_frames is not None and args.max_frames < 1:
            raise UserError(f"--max_frames must be >= 1, got {args.max_frames}")
        if args.max_queue < 0:
            raise UserError(f"--max_queue must be >= 0, got {args.max_queue}")
        pipe, cfg, info = load_pipeline(args)
        app = build_app(pipe, settings_for(pipe, cfg, args.max_frames), max_queue=args.max_queue, info=info,
                        hosts=(*LOOPBACK_HOSTS, args.host))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", ws_max_size=1 << 20,
                            ws_per_message_deflate=False)  # JPEGs do not compress; deflate only costs CPU
    server = uvicorn.Server(config)
    sock = config.bind_socket()  # bound first so that the printed URL carries the real port (also for --port 0)
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    print(f"Causal Forcing demo ({info['config']} on {info['device']}): open http://{shown}:{port}/ "
          "(Ctrl+C stops it)", flush=True)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
