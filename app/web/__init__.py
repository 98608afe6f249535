"""The interactive demo behind ``demo.py``: a Starlette app that streams a causal generator's frames to one web page.

- :mod:`app.web.session`: what one generation is (request checks, the worker thread, frame encoding, mp4 store).
- :mod:`app.web.server`: the ASGI app (page, WebSocket protocol, one generation per device with a queue, downloads).
- ``app/web/index.html``: the page (no external assets; plays the frames at the video's frame rate from a small buffer).
"""
