"""An example prerank plugin: `example_fm`, a factorisation machine as a pre-ranker (see fm.py).

Nothing is registered here: prerank reads the `prerank.models` entry point of this distribution
and imports `prerank_custom_model.fm` when the model is first asked for.
"""
