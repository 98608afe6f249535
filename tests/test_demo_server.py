"""The demo server (app/web/) on a tiny Wan folder, in-process over the WebSocket: frames, prompt switch, stop,
disconnect, queueing, input checks, downloads. The mp4 and the frames are compared with the streaming pipeline run
directly."""

import gc
import io
import json
import threading
import time
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from app.web import session as demo_session  # noqa: E402
from app.web.server import LOOPBACK_HOSTS, build_app  # noqa: E402
from app.web.session import encode_jpeg, settings_for  # noqa: E402
from pipeline.streaming import StreamingPipeline  # noqa: E402
from tests.conftest import write_tiny_stream_config
from utils.config import load_config  # noqa: E402
from utils.video import read_mp4, safe_output_name, to_uint8_frames, write_mp4  # noqa: E402

PROMPT = "a red circle moving left slowly"
OTHER = "a yellow square moving down quickly"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_models")
    write_tiny_stream_config(root)
    cfg = load_config(str(root / "tiny.yaml"))
    pipe = StreamingPipeline.from_config(cfg, device="cpu")
    return pipe, cfg


def make_app(world, max_queue=2, max_frames=None, hosts=(*LOOPBACK_HOSTS, "testserver")):
    """The demo app; TestClient addresses its requests to ``testserver``, so that name is served too."""
    pipe, cfg = world
    return build_app(pipe, settings_for(pipe, cfg, max_frames), max_queue=max_queue, hosts=hosts)


class Gate:
    """Holds the worker between blocks (before it picks up switches and stops) until the test lets it go on."""

    def __init__(self, monkeypatch):
        self.sem = threading.Semaphore(0)
        original = demo_session.Generation._take_switch

        def gated(generation):
            if generation.frames_done > 0:
                assert self.sem.acquire(timeout=60), "test gate never opened"
            return original(generation)
        monkeypatch.setattr(demo_session.Generation, "_take_switch", gated)

    def step(self, n=1):
        self.sem.release(n)


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def receive(ws):
    """Next server message: a dict (JSON) or ``(index, RGB array)`` for a frame."""
    msg = ws.receive()
    if msg.get("text") is not None:
        return json.loads(msg["text"])
    data = msg["bytes"]
    return int.from_bytes(data[:4], "big"), decode(data[4:])


def collect(ws, until="done", on_block=None):
    """Messages up to and including the first of type ``until``: (frames by index, JSON messages)."""
    frames, messages = {}, []
    while True:
        m = receive(ws)
        if isinstance(m, tuple):
            frames[m[0]] = m[1]
            continue
        messages.append(m)
        if m["type"] == "block" and on_block is not None:
            on_block(m, frames)
        if m["type"] == until:
            return frames, messages


def start(ws, **kw):
    hello = receive(ws)
    assert hello["type"] == "hello"
    ws.send_text(json.dumps(dict(type="start", prompt=PROMPT, seed=5, steps=4, frames=6) | kw))
    return hello


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_stream_frames_and_download_match_inference(world, tmp_path):
    pipe, cfg = world
    app = make_app(world)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        hello = start(ws)
        frames, messages = collect(ws)
        done = messages[-1]
        video = client.get("/" + done["download"])
    assert hello["settings"]["steps"] == [1, 2, 4] and hello["settings"]["mode"] == "chunk-wise"
    blocks = [m for m in messages if m["type"] == "block"]
    # the first frame is sent alone, then the rest of its block
    assert [b["first_frame"] for b in blocks] == [0, 1, 9] and [b["frames"] for b in blocks] == [1, 8, 12]
    assert sorted(frames) == list(range(21)) and done["frames"] == 21 and not done["stopped"]
    # the same video as the pipeline run directly: each frame is exactly the JPEG of the directly generated one
    direct = pipe.generate(PROMPT, num_latent_frames=6, seed=5, output_type="pt").frames
    ref = to_uint8_frames(direct[0], (-1, 1), "TCHW")
    for i in range(21):
        jpeg = encode_jpeg(ref[i], app.state.demo.settings.jpeg_quality)
        np.testing.assert_array_equal(frames[i], decode(jpeg))
    # the download is the mp4 that inference.py's writer makes from the same frames (byte-identical decode)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert quote(safe_output_name(PROMPT) + ".mp4") in video.headers["content-disposition"]
    (tmp_path / "got.mp4").write_bytes(video.content)
    write_mp4(tmp_path / "ref.mp4", direct[0], fps=cfg.fps, value_range=(-1, 1), layout="TCHW")
    np.testing.assert_array_equal(read_mp4(tmp_path / "got.mp4"), read_mp4(tmp_path / "ref.mp4"))


def test_switch_changes_only_frames_after_it(world, monkeypatch):
    pipe, _ = world
    app = make_app(world)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            start(ws)
            base, _ = collect(ws)
        gate = Gate(monkeypatch)
        with client.websocket_connect("/ws") as ws:
            start(ws)

            def switch_after_first(block, frames):
                if block["first_frame"] == 0:     # the video's first frame (sent alone)
                    while len(frames) < block["frames"]:   # the block's frames follow its header
                        m = receive(ws)
                        frames[m[0]] = m[1]
                    ws.send_text(json.dumps(dict(type="switch", prompt=OTHER)))
                    assert receive(ws)["type"] == "switch_pending"
                gate.step()
            switched, messages = collect(ws, on_block=switch_after_first)
    blocks = [m for m in messages if m["type"] == "block"]
    # the switch lands on the first block not yet generated: block 1 (block 0's other frames were already made)
    assert [b["switched"] for b in blocks] == [False, False, True] and blocks[2]["prompt"] == OTHER
    assert sorted(switched) == sorted(base) == list(range(21))
    for i in range(9):          # block 0: generated before the switch, identical
        np.testing.assert_array_equal(switched[i], base[i])
    # block 1 onwards: under the new prompt. The tiny random text encoder moves pixels only a little (a fraction of
    # a level on average), so: they differ, and they are exactly the JPEGs of the pipeline run with the same switch
    assert np.mean([np.abs(switched[i].astype(int) - base[i]).mean() for i in range(9, 21)]) > 0.05
    stream = pipe.open(PROMPT, num_latent_frames=6, seed=5)
    next(stream)
    stream.switch_prompt(OTHER)
    assert not next(stream).switched   # the rest of block 0
    ref = to_uint8_frames(next(stream).frames[0], (-1, 1), "TCHW")
    for i in range(9, 21):
        np.testing.assert_array_equal(switched[i], decode(encode_jpeg(ref[i - 9], 90)))


def test_stop_keeps_the_frames_so_far(world, monkeypatch):
    gate = Gate(monkeypatch)
    app = make_app(world)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        start(ws, frames=9)

        def stop_after_first(block, frames):
            if block["first_frame"] == 0:       # the first frame alone: go on to the rest of block 0
                gate.step()
                return
            ws.send_text(json.dumps(dict(type="stop")))
            time.sleep(0.2)     # the stop reaches the server before the worker is let go
            gate.step(5)
        frames, messages = collect(ws, on_block=stop_after_first)
        done = messages[-1]
        video = client.get("/" + done["download"])
    assert done["stopped"] and done["frames"] == 9 and len(frames) == 9
    assert video.status_code == 200


def test_disconnect_stops_generation_and_frees_memory(world, monkeypatch):
    gate = Gate(monkeypatch)
    app = make_app(world)
    state = app.state.demo
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            start(ws, frames=9)
            collect(ws, until="block")
            # let the worker go on only once the disconnect has been seen (closing may wait for the handler)
            threading.Timer(0.5, gate.step, args=(5,)).start()
        wait_for(lambda: state.slot.active is None)
        generation = state.generations[-1]
        assert generation.finished and generation.frames_done < 21   # ended early
        assert generation.cache.k.numel() == 0      # KV cache released
        gc.collect()
        assert generation.stream_ref() is None       # nothing keeps the stream (decoder caches, latents) alive
        assert state.store.get("x") is None and not list(state.store._files)   # no mp4 for a vanished client
        with client.websocket_connect("/ws") as ws:  # the device is free at once
            start(ws, frames=3)
            m = receive(ws)
            assert m["type"] == "started"
            gate.step(5)
            collect(ws)


def test_second_client_is_queued_and_third_is_told_busy(world, monkeypatch):
    gate = Gate(monkeypatch)
    app = make_app(world, max_queue=1)
    with TestClient(app) as client, client.websocket_connect("/ws") as a, \
            client.websocket_connect("/ws") as b, client.websocket_connect("/ws") as c:
        start(a, frames=6)
        collect(a, until="block")
        start(b, frames=3)
        queued = receive(b)
        assert queued["type"] == "queued" and queued["position"] == 1 and "busy" in queued["message"]
        b.send_text(json.dumps(dict(type="stop")))              # leaving the queue...
        left = receive(b)
        assert left["type"] == "done" and left["stopped"] and left["frames"] == 0
        assert app.state.demo.slot.waiting == []
        b.send_text(json.dumps(dict(type="start", prompt=PROMPT, frames=3)))   # ...and joining it again
        assert receive(b)["type"] == "queued"
        start(c, frames=3)
        busy = receive(c)
        assert busy["type"] == "busy" and "busy" in busy["message"]
        gate.step(10)
        _, messages = collect(a)
        assert not messages[-1]["stopped"]
        frames, messages = collect(b)
        assert messages[0]["type"] == "started" and len(frames) == 9


BAD = [
    (dict(type="start", prompt="   "), "prompt is empty"),
    (dict(type="start", prompt="x" * 2001), "limit is 2000"),
    (dict(type="start", prompt=["list"]), "prompt must be text"),
    (dict(type="start", prompt=PROMPT, steps=3), "steps must be one of [1, 2, 4]"),
    (dict(type="start", prompt=PROMPT, steps="4"), "steps must be a whole number"),
    (dict(type="start", prompt=PROMPT, frames=5), "not a multiple of num_frame_per_block=3"),
    (dict(type="start", prompt=PROMPT, frames=0), "frames must be between 1 and 60"),
    (dict(type="start", prompt=PROMPT, frames=63), "frames must be between 1 and 60"),
    (dict(type="start", prompt=PROMPT, seed=-1), "seed must be between 0 and 4294967295"),
    (dict(type="start", prompt=PROMPT, seed=2**40), "seed must be between"),
    (dict(type="start", prompt=PROMPT, seed=True), "seed must be a whole number"),
    (dict(type="start", prompt=PROMPT, seed=1.5), "seed must be a whole number"),
    (dict(type="switch", prompt=OTHER), "nothing to switch"),
    (dict(type="launch"), "unknown message type"),
    ([1, 2], "must be a JSON object"),
    ("{not json", "not valid JSON"),
]


def test_bad_inputs_get_a_clear_message(world):
    app = make_app(world)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive(ws)
        for msg, expected in BAD:
            ws.send_text(msg if isinstance(msg, str) else json.dumps(msg))
            reply = receive(ws)
            assert reply["type"] == "error" and expected in reply["message"], (msg, reply)
        ws.send_bytes(b"\x00\x01")
        assert "JSON text" in receive(ws)["message"]
        assert app.state.demo.generations == []     # nothing was started


def test_page_downloads_and_origin(world):
    app = make_app(world)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text   # works offline: no external assets
        assert "innerHTML" not in page.text and "insertAdjacentHTML" not in page.text
        for token in ("nope", "..%2F..%2Fetc%2Fpasswd", "%2e%2e"):
            assert client.get(f"/video/{token}").status_code == 404
        with pytest.raises(Exception):
            with client.websocket_connect("/ws", headers={"origin": "http://evil.example"}) as ws:
                ws.receive()
        with client.websocket_connect("/ws", headers={"origin": "http://testserver"}) as ws:
            assert receive(ws)["type"] == "hello"


def test_demo_cli_builds_like_inference(world, tmp_path, capsys):
    import demo

    yaml = f"{world[1].wan_models_dir}/tiny.yaml"
    args = demo.parse_args(["--config_path", yaml, "--device", "cpu", "--local_attn_size", "6", "--sink_size", "3",
                            "--override", "fps=4"])
    assert args.host == "127.0.0.1"      # loopback unless --host says otherwise
    pipe, cfg, info = demo.load_pipeline(args)
    assert cfg.fps == 4 and pipe.local_attn_size == 6 and pipe.sink_size == 3 and info["device"] == "CPU"
    assert demo.main(["--config_path", yaml, "--checkpoint_path", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_only_the_served_hosts_are_answered(world):
    """DNS rebinding: a page on another name that resolves to 127.0.0.1 sends its own name as Host (and as Origin, so
    the same-origin check passes). Only the bound hosts are answered, over HTTP and the WebSocket."""
    app = make_app(world, hosts=LOOPBACK_HOSTS)
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:
        for host in ("127.0.0.1:7860", "localhost:7860", "LOCALHOST.", "[::1]:7860"):
            assert client.get("/", headers={"host": host}).status_code == 200, host
        for host in ("evil.example:7860", "attacker.127.0.0.1.nip.io", "10.0.0.1", ""):
            page = client.get("/", headers={"host": host})
            assert page.status_code == 421 and "127.0.0.1, ::1, localhost" in page.text, host
        with pytest.raises(Exception):
            with client.websocket_connect("/ws", headers={"host": "evil.example:7860",
                                                          "origin": "http://evil.example:7860"}) as ws:
                ws.receive()
        with client.websocket_connect("/ws", headers={"host": "127.0.0.1:7860",
                                                      "origin": "http://127.0.0.1:7860"}) as ws:
            assert receive(ws)["type"] == "hello"
    wildcard = make_app(world, hosts=(*LOOPBACK_HOSTS, "0.0.0.0"))     # demo.py --host 0.0.0.0: any IP, no names
    with TestClient(wildcard, base_url="http://192.168.1.7:7860") as client:
        assert client.get("/").status_code == 200
        assert client.get("/", headers={"host": "[fe80::1]:7860"}).status_code == 200
        assert client.get("/", headers={"host": "rebound.example:7860"}).status_code == 421


def test_deeply_nested_json_gets_an_error_reply(world):
    """A message nested deeper than the JSON parser's recursion limit is answered with an error; the connection and
    the server go on."""
    app = make_app(world)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        assert receive(ws)["type"] == "hello"
        for text in ("[" * 30000, '{"a":' * 6000 + "1" + "}" * 6000):
            ws.send_text(text)
            assert receive(ws) == {"type": "error", "message": "message is nested too deeply"}
        ws.send_text(json.dumps({"type": "stop"}))
        ws.send_text("[]")
        assert receive(ws)["message"] == "message must be a JSON object"


def test_until_stopped_streams_past_any_length_until_stop(world, tmp_path):
    """``endless: true``: blocks keep coming, with a prompt switch, far past the longest video a client may ask
    for (max_frames 6 here), until the client presses Stop; the mp4 holds what was streamed."""
    app = make_app(world, max_frames=6)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        start(ws, endless=True, frames=10**6)    # frames is ignored (it would be refused otherwise)
        started = receive(ws)
        assert started["type"] == "started" and started["frames"] is None and started["pixel_frames"] is None

        def on_block(m, frames):
            if m["index"] == 3:
                ws.send_text(json.dumps(dict(type="switch", prompt=OTHER)))
            if m["index"] == 12:
                ws.send_text(json.dumps(dict(type="stop")))
        frames, messages = collect(ws, on_block=on_block)
        done = messages[-1]
        video = client.get("/" + done["download"])
    blocks = [m for m in messages if m["type"] == "block"]
    assert done["stopped"] and len(blocks) >= 13 and done["frames"] == len(frames) > 21
    assert any(b["switched"] and b["prompt"] == OTHER for b in blocks)
    path = tmp_path / "endless.mp4"
    path.write_bytes(video.content)
    assert read_mp4(path).shape[0] == done["frames"]
    generation = app.state.demo.generations[-1]
    assert generation.finished and generation.cache.k.numel() == 0
