"""Applications on top of the library: the work behind ``inference.py`` (:mod:`app.jobs`) and ``demo.py``
(:mod:`app.web`), the flags they share (:mod:`app.cli`) and the video-encoding tool (:mod:`app.encode_videos`).

Nothing in ``model``, ``pipeline``, ``trainer`` or ``utils`` imports this package.
"""
