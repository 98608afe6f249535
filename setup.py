"""Install the project's packages (model, pipeline, trainer, utils; the apps in app/ and the toy world in toy/) so
scripts and tests import them from anywhere.

`pip install -e .` for development; dependencies are read from requirements.txt (test-only ones left out).
"""

from pathlib import Path

from setuptools import find_packages, setup

TEST_ONLY = {"pytest", "httpx", "selenium"}


def _requirements() -> list:
    lines = (Path(__file__).parent / "requirements.txt").read_text().splitlines()
    reqs = [line.split("#", 1)[0].strip() for line in lines]
    return [r for r in reqs if r and r.split(">")[0].split("=")[0].split("<")[0].strip().lower() not in TEST_ONLY]


setup(
    name="causal-forcing",
    version="0.1.0",
    description="Causal Forcing: streaming autoregressive video generation distilled from Wan2.1",
    python_requires=">=3.10",
    packages=find_packages(include=["model", "model.*", "pipeline", "pipeline.*", "trainer", "trainer.*",
                                    "utils", "utils.*", "app", "app.*", "toy", "toy.*"]),
    package_data={"app.web": ["index.html"]},
    install_requires=_requirements(),
    extras_require={
        "fa4": ["flash-attn-4"],  # FlashAttention-4 (Hopper, Blackwell): wheels only, no build
        "flash": ["flash-attn"],  # FlashAttention-2: CUDA build, pip install -e .[flash] --no-build-isolation
        "clip": ["open_clip_torch"],
        "demo": ["starlette>=0.37", "uvicorn>=0.30", "websockets>=13"],  # already in requirements.txt
    },
)
