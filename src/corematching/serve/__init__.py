"""`corematching serve`: an OpenAI-compatible HTTP server with per-request sparsity and dynamic batching.

    app.py           routes: /v1/chat/completions, /v1/models, /health, the web page
    protocol.py      request body -> validated ChatRequest (4xx in OpenAI's error shape otherwise)
    methods.py       the "corematching" extension field -> a method object
    images.py        data: URLs and files of an allowed directory -> PIL images
    scheduler.py     bounded queue and dynamic batching
    worker.py        the model worker: one batch through generate, per-request sampling / stop / streaming
    sampling.py, decoding.py, prefix_cache.py, jobs.py, examples.py, cli.py, static/
"""

from .cli import main

__all__ = ["main"]
