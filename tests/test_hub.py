"""Downloads on demand, against a fake Hugging Face Hub on 127.0.0.1 (no network).

The server answers the two requests ``hf_hub_download`` makes for a file, ``HEAD`` and ``GET`` of
``/{repo}/resolve/{revision}/{filename}``, with the ETag and X-Repo-Commit headers the library reads. Each download
runs in a subprocess whose environment points ``HF_ENDPOINT`` at the server and ``HF_HOME`` at a temporary folder
(huggingface_hub reads both once, at import); the files then sit in the library's own cache layout, which the offline
runs read.
"""

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOY_INFERENCE = [str(REPO / "inference.py"), "--config_path", "configs/toy/causal_forcing_dmd_chunkwise.yaml",
                 "--prompt", "a red circle moving down quickly", "--output_folder", "out"]
TOY_CKPT = REPO / "assets/toy/checkpoints/chunkwise/causal_forcing.pt"


class FakeHub:
    """``repos``: ``{repo_id: {filename: bytes}}``; ``requests``: every (method, path) received."""

    def __init__(self, repos: dict):
        self.repos, self.requests = repos, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def file_requests(self) -> list:
        return [(m, p) for m, p in self.requests if "/resolve/" in p]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].lstrip("/").split("/")
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                data = hub.repos.get(repo, {}).get(name) if parts[2:3] == ["resolve"] else None
                self.send_response(404 if data is None else 200)
                if data is None:
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                else:
                    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header("X-Repo-Commit", hashlib.sha1(repo.encode()).hexdigest())
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and data is not None:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        return Handler


@pytest.fixture
def hub():
    wan = {"config.json": b"{}", "diffusion_pytorch_model.safetensors": b"dit", "Wan2.1_VAE.pth": b"vae",
           "models_t5_umt5-xxl-enc-bf16.pth": b"t5",
           **{f"google/umt5-xxl/{n}": n.encode() for n in ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                                                           "special_tokens_map.json")}}
    sharded = {"config.json": b"{}", "diffusion_pytorch_model.safetensors.index.json":
               b'{"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors", "c": "part-1.safetensors"}}',
               "part-1.safetensors": b"1", "part-2.safetensors": b"2"}
    fake = FakeHub({"zhuhz22/Causal-Forcing": {"chunkwise/causal_forcing.pt": TOY_CKPT.read_bytes()},
                    "Wan-AI/Wan2.1-T2V-1.3B": wan, "Wan-AI/Wan2.1-T2V-14B": sharded})
    yield fake
    fake.server.shutdown()


def run(tmp_path: Path, hub: FakeHub, args: list, offline: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def resolve(tmp_path, hub, call: str, offline: bool = False) -> str:
    """The last stdout line of ``print(<call>)`` with model.weights' functions, run against the fake Hub."""
    code = f"from model.weights import resolve_checkpoint, resolve_wan_folder\nprint({call})"
    out = run(tmp_path, hub, ["-c", code], offline)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_released_checkpoint_path_is_downloaded_into_its_folder(tmp_path, hub):
    path = resolve(tmp_path, hub, "resolve_checkpoint('checkpoints/chunkwise/causal_forcing.pt')")
    assert path == str(tmp_path / "checkpoints/chunkwise/causal_forcing.pt")   # hf_hub_download's absolute path
    assert (tmp_path / "checkpoints/chunkwise/causal_forcing.pt").read_bytes() == TOY_CKPT.read_bytes()
    n = len(hub.file_requests())
    resolve(tmp_path, hub, "resolve_checkpoint('checkpoints/chunkwise/causal_forcing.pt')")
    assert len(hub.file_requests()) == n   # there now: no request


def test_hub_reference_goes_to_the_cache_and_is_found_there_offline(tmp_path, hub):
    ref = "'zhuhz22/Causal-Forcing/chunkwise/causal_forcing.pt'"
    path = Path(resolve(tmp_path, hub, f"resolve_checkpoint({ref})"))
    assert path.is_relative_to(tmp_path / "hf" / "hub" / "models--zhuhz22--Causal-Forcing" / "snapshots")
    assert path.read_bytes() == TOY_CKPT.read_bytes()
    n = len(hub.requests)
    assert Path(resolve(tmp_path, hub, f"resolve_checkpoint({ref})", offline=True)) == path
    assert len(hub.requests) == n


def test_offline_downloads_nothing_and_names_the_command(tmp_path, hub):
    assert resolve(tmp_path, hub, "resolve_checkpoint('checkpoints/chunkwise/causal_forcing.pt')",
                   offline=True) == "checkpoints/chunkwise/causal_forcing.pt"
    out = run(tmp_path, hub, [*TOY_INFERENCE, "--offline", "--checkpoint_path",
                              "zhuhz22/Causal-Forcing/chunkwise/causal_forcing.pt"])
    assert out.returncode == 2 and hub.file_requests() == []
    assert out.stderr.strip().splitlines()[-1] == (
        "error: checkpoint not found: zhuhz22/Causal-Forcing/chunkwise/causal_forcing.pt; get it with: "
        "hf download zhuhz22/Causal-Forcing chunkwise/causal_forcing.pt")


def test_inference_with_a_hub_checkpoint_writes_a_video(tmp_path, hub):
    out = run(tmp_path, hub, [*TOY_INFERENCE, "--num_output_frames", "3", "--checkpoint_path",
                              "zhuhz22/Causal-Forcing/chunkwise/causal_forcing.pt"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "out" / "a red circle moving down quickly.mp4").stat().st_size > 0
    assert ("GET", "/zhuhz22/Causal-Forcing/resolve/main/chunkwise/causal_forcing.pt") in hub.requests


def test_wan_folder_gets_only_its_missing_parts(tmp_path, hub):
    folder = tmp_path / "wan_models" / "Wan2.1-T2V-1.3B"
    folder.mkdir(parents=True)
    (folder / "Wan2.1_VAE.pth").write_bytes(b"mine")
    got = resolve(tmp_path, hub, "resolve_wan_folder('wan_models', 'Wan2.1-T2V-1.3B', ('text_encoder', 'tokenizer', "
                                 "'vae'))")
    assert Path(got) == Path("wan_models/Wan2.1-T2V-1.3B")
    names = {p.split("/resolve/main/")[1] for m, p in hub.file_requests() if m == "GET"}
    assert names == {"models_t5_umt5-xxl-enc-bf16.pth", *(f"google/umt5-xxl/{n}" for n in (
        "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))}
    assert (folder / "Wan2.1_VAE.pth").read_bytes() == b"mine" and (folder / "google/umt5-xxl/spiece.model").is_file()
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()   # not asked for


def test_sharded_dit_and_a_hub_repository_as_folder_name(tmp_path, hub):
    got = resolve(tmp_path, hub, "resolve_wan_folder('wan_models', 'Wan2.1-T2V-14B', ('dit',))")
    folder = tmp_path / got
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
        "config.json", "diffusion_pytorch_model.safetensors.index.json", "part-1.safetensors", "part-2.safetensors"]
    snapshot = Path(resolve(tmp_path, hub, "resolve_wan_folder('wan_models', 'Wan-AI/Wan2.1-T2V-1.3B', ('vae',))"))
    assert snapshot.is_relative_to(tmp_path / "hf" / "hub") and (snapshot / "Wan2.1_VAE.pth").read_bytes() == b"vae"
    offline = resolve(tmp_path, hub, "resolve_wan_folder('wan_models', 'Wan-AI/Wan2.1-T2V-1.3B', ('vae',))", True)
    assert Path(offline) == snapshot
