"""The toy world: captioned synthetic clips of coloured shapes (:mod:`toy.world`), complete tiny Wan model folders
(:mod:`toy.folders`), the toy VAE's training (:mod:`toy.vae`) and the folder builder (:mod:`toy.build_models`), the
evaluator (:mod:`toy.eval`, :mod:`toy.eval_videos`) and the whole recipe (:mod:`toy.recipe`) that runs every stage
through the project's own entry points. Run its tools as ``python -m toy.<name>``.

Nothing in ``model``, ``pipeline``, ``trainer`` or ``utils`` imports this package.
"""
