"""The tools built on the library: everything that runs models for users.

    cli.py            the `corematching` command: a dispatcher over the subcommands below (`python -m corematching`)
    ask.py            one question about one image (`corematching --image ... --question ...`)
    demo.py           the demo (`corematching demo`, `make demo`): bundled models, dense vs CoreMatching vs random
    eval_command.py   `corematching eval`;  evaluate.py  the resumable evaluation harness, object recall
    distributed.py    evaluation sharded across torchrun ranks (`torchrun ... -m corematching eval`)
    scenes_eval.py    accuracy of scenes-smollm2 per question kind (`python -m corematching.apps.scenes_eval`)
    bench.py          `corematching bench`: accuracy, FLOPs, latency and memory per method
    plan_command.py   `corematching plan` (the library's `plan_memory` on a model folder)
    method_spec.py    methods by name for the command line and the tools (`name:field=value,...`)
    viz.py            kept-patch pictures
    serve/            `corematching serve`: the OpenAI-compatible HTTP server and its web page
    integrations/     the lmms-eval model and local task

The rule is one way: these modules import the library (methods, models, runtime, selection, ...) and the bundled
models (zoo); no module outside this package imports it, except `corematching/__main__.py`, which runs the CLI.
tests/test_library_layers.py checks it.
"""
