"""`corematching serve`: an OpenAI-compatible HTTP server with per-request sparsity and dynamic batching.

    app.py           routes: /v1/chat/completions, /v1/models, /health, the web page; the bounded body read
    guard.py         the API key and the Host header, checked before any route
    protocol.py      request body -> JSON -> validated ChatRequest (4xx in OpenAI's error shape otherwise)
    methods.py       the "corematching" extension field -> a method object (corematching.apps.serve.request_methods'
                     allow-list of typed settings)
    images.py        data: URLs and files of an allowed directory -> PIL images
    scheduler.py     bounded queue and dynamic batching (and the draining queue both schedulers share)
    continuous_scheduler.py  the server's scheduler for --batching continuous: one thread stepping the batcher
    continuous.py    iteration-level batching: arrivals prefilled together join the running decode batch
    sequence.py      a request inside the batcher, its inputs joined into one prefill, its KV bytes
    choose.py        every running row's next token on the device (greedy or seeded sampling)
    stream_text.py   one request's text grown incrementally: stop sequences, end tokens, what can stream now
    metrics.py       percentiles and the /metrics text (Prometheus format)
    worker.py        the model worker: one batch through generate, per-request sampling / stop / streaming
    collate.py       per-request encodings (made once, on arrival) -> one padded batch
    sampling.py      per-request token choice (greedy, or sampling from its own seeded generator)
    decoding.py      the static path's stopping criteria: each row's StreamText, disconnects while decoding
    prompt_cache.py  pruned prefills of repeated image + whole prompt, continued from copies
    jobs.py          an accepted request and the bridge from the worker thread to the event loop
    process.py       the server in a child process on a free loopback port (tests, benchmarks)
    cli.py           `corematching serve`;  examples.py, static/  the web page
"""

from .cli import main

__all__ = ["main"]
