"""Install the project's packages (model, pipeline, trainer, utils; the apps in app/ and the toy world in toy/) so
scripts and tests import them from anywhere, with every dependency the code imports.

    python -m pip install torch==2.13.0          # first, pinned (README): a bare `torch` pulls a multi-GB CUDA build
    python -m pip install -e ".[test]"           # the project, editable, with what the tests need

This file is the one list of dependencies; requirements.txt only points here (``-e .[test]``), so the published
``pip install -r requirements.txt`` and ``python setup.py develop`` still work.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.6",               # any installed torch >= 2.6 satisfies it, so pip never swaps in another build
    # model/vae.py's streaming decoder drives AutoencoderKLWan's private decoder modules: bounded to the versions
    # tests/test_vae.py was run against (re-check them before raising the bound)
    "diffusers>=0.35,<0.43",
    "transformers>=5.0",        # UMT5 encoder and tokenizer
    "sentencepiece>=0.2",       # the UMT5 tokenizer's spiece.model
    "protobuf>=3.20",           # transformers reads spiece.model through it (5.25 without it misreads it as tiktoken)
    "huggingface_hub>=0.34",    # downloads of Wan folders and released checkpoints (model/weights.py)
    "safetensors>=0.4.3",
    "omegaconf>=2.3",
    "PyYAML>=6.0",
    "numpy>=1.26",
    "Pillow>=10.0",             # I2V images, the demo's JPEG frames, PIL output of the pipeline, pictures
    "lmdb>=1.4",
    "imageio>=2.34",
    "imageio-ffmpeg>=0.5",      # the ffmpeg binary behind imageio's mp4 writer
    "ftfy>=6.1",                # Wan's prompt cleaning
    "tqdm>=4.66",
    "starlette>=0.37",          # demo.py: the web app (ASGI, WebSockets)
    "uvicorn>=0.30",            # demo.py: the ASGI server
    "websockets>=13",           # uvicorn's WebSocket protocol; the client of benchmarks/bench_demo.py
]

EXTRAS = {
    "wandb": ["wandb>=0.19"],   # Weights & Biases logging (wandb_mode: online/offline)
    "plot": ["matplotlib>=3.7"],  # python -m app.plot_losses LOGDIR
    "fa4": ["flash-attn-4"],    # FlashAttention-4 (Hopper, Blackwell): wheels only, no build
    "flash": ["flash-attn"],    # FlashAttention-2: CUDA build, pip install -e .[flash] --no-build-isolation
}
# Tests: pytest, starlette's in-process TestClient (httpx), the demo's browser test (selenium + Debian's chromium),
# and the extras whose code the tests run.
EXTRAS["test"] = ["pytest>=8.0", "httpx>=0.27", "selenium>=4.20", *EXTRAS["plot"]]

setup(
    name="causal-forcing",
    version="0.1.0",
    description="Causal Forcing: streaming autoregressive video generation distilled from Wan2.1",
    python_requires=">=3.10",
    packages=find_packages(include=["model", "model.*", "pipeline", "pipeline.*", "trainer", "trainer.*",
                                    "utils", "utils.*", "app", "app.*", "toy", "toy.*"]),
    package_data={"app.web": ["index.html"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
