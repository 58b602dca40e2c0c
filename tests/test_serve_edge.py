"""The server's edge against hostile clients: the request surface is an allow-list (nothing a request gives reaches
the file system or the import system), bodies are bounded as they arrive, malformed input is a 4xx, the API key
and the Host header are checked, the prompt cache is bounded in bytes. Units first, then one server (the bundled
model, started with a key) driven over raw HTTP."""

import ast
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")

import corematching as cm  # noqa: E402
from corematching.apps import method_spec  # noqa: E402
from corematching.apps.method_spec import MethodSpecError  # noqa: E402
from corematching.apps.serve.errors import APIError  # noqa: E402
from corematching.apps.serve.guard import allowed_hosts_for, host_name  # noqa: E402
from corematching.apps.serve.images import local_path  # noqa: E402
from corematching.apps.serve.methods import parse_method  # noqa: E402
from corematching.apps.serve.prompt_cache import PrefillEntry, PromptCache, tensor_bytes  # noqa: E402
from corematching.apps.serve.protocol import parse_json  # noqa: E402
from corematching.apps.serve.request_methods import REQUEST_SETTINGS, build_from_request  # noqa: E402

SRC = Path(cm.__file__).parent
SECRET = "TOPSECRET-7f3a"


# ---------------------------------------------------------------------------------------------- the allow-list


def test_a_request_cannot_name_a_file_and_the_answer_does_not_depend_on_it(tmp_path):
    secret = tmp_path / "budgets.json"
    secret.write_text(json.dumps({"1": 0.5, "note": SECRET}))
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"budgets": {"1": 0.5}}))  # a file the method could really read
    default = cm.CoreMatching()
    answers = []
    for value in (str(secret), str(calibration), str(tmp_path / "missing.json"), "/dev/zero", {"1": 0.5}):
        for request in ({"neuron_budgets": value}, {"method": "corematching", "neuron_budgets": value}):
            with pytest.raises(APIError) as caught:
                parse_method(request, default)
            answers.append((caught.value.status, json.dumps(caught.value.body())))
    assert len(set(answers)) == 1, answers  # the same answer whatever the value points to
    status, body = answers[0]
    assert status == 400 and SECRET not in body and "corematching.neuron_budgets" in body


@pytest.mark.parametrize("request_field, param", [
    ({"method": "corematching_x"}, "corematching.method"),
    ({"method": "os:system"}, "corematching.method"),  # never imported
    ({"method": "corematching.methods:CoreMatching"}, "corematching.method"),
    ({"method": "dense", "token_budget": 4}, "corematching.token_budget"),
    ({"method": "uniform", "seed": 1}, "corematching.seed"),
    ({"rho": "0.5"}, "corematching.rho"),  # a string is not a number
    ({"rho": True}, "corematching.rho"),
    ({"token_budget": [8]}, "corematching.token_budget"),
    ({"neuron_layers": list(range(300))}, "corematching.neuron_layers"),
    ({"neuron_layers": {"1": 2}}, "corematching.neuron_layers"),
    ({"method": "random", "seed": 2**64}, "corematching.seed"),  # torch's generator would overflow
    ({"match": ["text"]}, "corematching.match"),
    ({"__class__": 1}, "corematching.__class__"),
])
def test_a_request_sets_only_listed_typed_settings(request_field, param):
    with pytest.raises(APIError) as caught:
        parse_method(request_field, cm.CoreMatching())
    assert caught.value.status == 400 and caught.value.param == param


def test_importing_a_module_by_name_is_impossible_from_a_request(tmp_path, monkeypatch):
    (tmp_path / "planted_module_x.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MethodSpecError):
        build_from_request({"method": "planted_module_x:Anything"}, cm.Dense())
    assert "planted_module_x" not in sys.modules


def test_the_listed_settings_build_the_methods_the_python_api_builds():
    assert build_from_request({"method": "corematching", "token_budget": None, "neuron_layers": [2, 3],
                               "neuron_rule": "mass"}, cm.Dense()) == cm.CoreMatching(
        token_budget=None, neuron_layers=[2, 3], neuron_rule="mass")
    assert build_from_request({"token_budget": 0.5}, cm.RandomTokens(seed=4)) == cm.RandomTokens(0.5, seed=4)
    assert build_from_request({"method": "Uniform", "token_budget": 3}, None) == cm.UniformTokens(token_budget=3)
    for name, (cls, settings) in REQUEST_SETTINGS.items():
        assert build_from_request({"method": name}, None) == cls()
        fields = set(method_spec.init_fields(cls))
        assert {setting.name for setting in settings} <= fields, name
    # a server whose default method is not on the list takes no settings from a request
    with pytest.raises(MethodSpecError, match="does not take token_budget in a request"):
        build_from_request({"token_budget": 4}, cm.FastV())


def test_a_bad_value_gets_one_message_from_every_entry_point():

    for spec, request in [("corematching:rho=2", {"rho": 2}), ("corematching:beta=0", {"beta": 0})]:
        with pytest.raises(MethodSpecError) as from_spec:
            method_spec.build(spec)
        with pytest.raises(MethodSpecError) as from_request:
            build_from_request(request, cm.CoreMatching())
        assert str(from_spec.value) == str(from_request.value)
        assert from_spec.value.field == from_request.value.field == next(iter(request))
    args = __import__("argparse").Namespace(method="uniform", beta=0.5)
    with pytest.raises(MethodSpecError, match=r"UniformTokens does not take beta \(it takes") as from_args:
        method_spec.from_args(args)
    assert from_args.value.field == "beta"


@pytest.mark.skipif(__import__("importlib").util.find_spec("lmms_eval") is None, reason="lmms-eval not installed")
def test_the_lmms_eval_model_builds_through_the_same_builder():
    from corematching.apps.integrations.lmms_eval_model import build_method

    with pytest.raises(MethodSpecError, match=r"CoreMatching does not take bogus \(it takes") as caught:
        build_method("corematching", bogus=1)
    assert caught.value.field == "bogus"
    assert build_method("corematching", budget="adaptive").token_budget is None


def imported_modules(path: Path) -> set[str]:
    """The absolute names a module imports (for `from X import a`, both X and X.a)."""
    package = ["corematching", *path.parent.relative_to(SRC).parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            module = ".".join(part for part in (base, node.module or "") if part)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_no_library_module_imports_the_command_line():
    """The CLI dispatches to the library, never the other way round (no import circle through cli.py)."""
    importers = [str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                 if path.relative_to(SRC).as_posix() not in ("apps/cli.py", "__main__.py")
                 and "corematching.apps.cli" in imported_modules(path)]
    assert importers == []
    code = ("import sys, corematching.apps.bench, corematching.apps.serve.cli, corematching.apps.scenes_eval; "
            "assert 'corematching.apps.cli' not in sys.modules, 'cli imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC.parent)})


# ---------------------------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b'{"a": "\xff\xfe"}', "not valid JSON"),  # bad UTF-8
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": -Infinity}', "not a JSON number"),
    (b'{"a": 1e999}', "out of range"),
    (b'{"a": ' + b"9" * 5000 + b"}", "more than 40 digits"),
    (b"[" * 50000 + b"]" * 50000, "nested too deeply"),
    (b'{"a": ' * 20000 + b"1" + b"}" * 20000, "nested too deeply"),
])
def test_malformed_json_is_a_400(body, message):
    with pytest.raises(APIError) as caught:
        parse_json(body)
    assert caught.value.status == 400 and caught.value.code == "invalid_json" and message in caught.value.message


def test_bad_paths_are_400s_never_errors_or_blocking_reads(tmp_path):
    inside = tmp_path / "images"
    inside.mkdir()
    os.mkfifo(inside / "pipe.png")  # opening it for reading would block a worker thread
    (inside / "loop.png").symlink_to(inside / "loop.png")
    for url, code in [("a\x00b.png", "invalid_image_path"), ("file:///tmp/a%00b.png", "invalid_image_path"),
                      ("x" * 5000, "invalid_image_path"), ("y/" * 1500 + "a.png", "image_not_found"),
                      ("pipe.png", "image_not_found"), ("loop.png", "image_path_not_allowed"),
                      ("/dev/zero", "image_path_not_allowed")]:
        with pytest.raises(APIError) as caught:
            local_path(url, inside, "p")
        assert caught.value.status == 400 and caught.value.code == code, (url[:20], caught.value.code)


def test_host_names_and_defaults():
    assert host_name("Example.COM:8000") == "example.com" and host_name("[::1]:80") == "[::1]"
    assert host_name("localhost.") == "localhost"
    assert allowed_hosts_for(None, "127.0.0.1") == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_hosts_for(None, "0.0.0.0") is None
    assert allowed_hosts_for("*", "127.0.0.1") is None
    assert allowed_hosts_for("a.example, B.example:9", "127.0.0.1") == {"a.example", "b.example"}


# ---------------------------------------------------------------------------------------------- prompt cache


def entry(kib: int, session_id: int = 1) -> PrefillEntry:
    """An entry whose KV tensors take `kib` KiB (fp32 keys and values, half each)."""
    cache = type("Cache", (), {})()
    cache.layers = [{"keys": torch.zeros(kib * 128), "values": torch.zeros(kib * 128)}]
    return PrefillEntry(cache, torch.zeros(0), torch.zeros(1, 0, dtype=torch.long), 0, 0, [], session_id)


def test_prompt_cache_is_bounded_in_bytes():
    assert tensor_bytes(entry(3).cache) == 3 * 1024
    view = torch.zeros(1000)
    assert tensor_bytes([view, view[:10], view.view(10, 100)]) == 4000  # one storage, counted once
    cache = PromptCache(max_entries=100, max_bytes=20 * 1024)
    for key in range(12):
        assert cache.put(key, entry(4))  # 4 KiB each: at most 5 fit
        assert cache.bytes <= 20 * 1024
    assert len(cache) == 5 and cache.bytes == 5 * 4096
    assert cache.get(7, 1) is not None and cache.get(6, 1) is None  # least recently used went first
    assert not cache.put("huge", entry(21)) and cache.get("huge", 1) is None  # larger than the bound: not kept
    cache.drop_session(1)
    assert len(cache) == 0 and cache.bytes == 0


# ---------------------------------------------------------------------------------------------- over HTTP

MODEL = "evqa-smollm2"
KEY = "s3cret-key-for-tests"
BODY_LIMIT = 200_000
BODY_TIMEOUT = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from corematching.apps.serve.process import ServerProcess
    from corematching.zoo import data

    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "shape.png").write_bytes(Path(data.image_paths("test")[0]).read_bytes())
    arguments = ["--allowed-image-dir", str(allowed), "--default-max-tokens", "4", "--threads", "1",
                 "--max-body-bytes", str(BODY_LIMIT), "--max-wait-ms", "5", "--body-timeout", str(BODY_TIMEOUT)]
    process = ServerProcess(arguments, env={"COREMATCHING_API_KEY": KEY}).start()  # the key from the environment
    yield process
    process.stop()


def call(server, method="POST", path="/v1/chat/completions", body=b"", headers=None, key=KEY):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    status, text = response.status, response.read()
    connection.close()
    return status, json.loads(text) if text.startswith(b"{") else text


def chat(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                       **fields}).encode()


def test_every_route_but_health_needs_the_key(server):
    assert call(server, "GET", "/health", key=None)[0] == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/"),
                         ("GET", "/examples"), ("GET", "/static/index.html"), ("GET", "/no/such/route")]:
        for key in (None, "wrong", KEY + "x", ""):
            status, body = call(server, method, path, body=chat() if method == "POST" else b"", key=key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, key)
    status, body = call(server, "POST", body=chat(), headers={"Authorization": f"Basic {KEY}"}, key=None)
    assert status == 401
    status, models = call(server, "GET", "/v1/models")
    settings = models["data"][0]["request_methods"]
    assert status == 200 and "rho" in settings["corematching"] and "neuron_budgets" not in settings["corematching"]
    assert call(server, "POST", body=chat())[0] == 200


def test_another_host_name_is_refused(server):
    status, body = call(server, "GET", "/v1/models", headers={"Host": "attacker.example:80"})
    assert status == 400 and body["error"]["code"] == "host_not_allowed"
    assert call(server, "GET", "/health", headers={"Host": "attacker.example"}, key=None)[0] == 400
    assert call(server, "GET", "/v1/models", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_a_request_naming_a_file_gets_the_same_answer_whether_it_exists_or_not(server, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps([0.5, SECRET]))
    answers = [call(server, body=chat(corematching={"neuron_budgets": path}))
               for path in (str(secret), str(tmp_path / "missing.json"), "/dev/zero")]
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 400 and answers[0][1]["error"]["param"] == "corematching.neuron_budgets"
    assert SECRET not in json.dumps(answers[0][1])


@pytest.mark.parametrize("body", [
    b"{not json", b'{"model": "\xff"}', b'{"model": "evqa-smollm2", "temperature": NaN}', b"[" * 60000 + b"]" * 60000,
    b'{"model": "evqa-smollm2", "max_tokens": ' + b"9" * 4500 + b"}", b'{"\\ud800": 1}',
    chat(temperature=10**30), chat(messages=[{"role": "user", "content": "\ud800"}]),
    chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "shape\x00.png"}},
                                                {"type": "text", "text": "what?"}]}]),
    chat(corematching={"prune_layer": 999}), chat(corematching={"neuron_layers": [999]}),
    chat(corematching={"method": "random", "seed": 2**70}), chat(stop=["\udfff"]), chat(**{"x" * 100000: 1}),
    chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                    + "A" * 1000}}]}]),
])
def test_malformed_input_is_a_4xx_never_a_500(server, body):
    status, answer = call(server, body=body)
    assert 400 <= status < 500, answer
    assert len(json.dumps(answer)) < 1500  # errors quote what was sent only in part


def test_a_body_over_the_limit_is_refused_as_it_arrives_chunked_or_not(server):
    status, answer = call(server, body=b"{}", headers={"Content-Length": str(10**9)})
    assert status == 413
    image = base64.b64encode(os.urandom(BODY_LIMIT)).decode()
    status, answer = call(server, body=chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]))
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    # a chunked body with no length: the server answers 413 once the limit is passed and reads no further
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                    + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
        sent, reply = 0, b""
        raw.settimeout(0.05)
        deadline = time.monotonic() + 60
        try:
            while not reply and sent < 50 * BODY_LIMIT and time.monotonic() < deadline:
                raw.sendall(b"2000\r\n" + b" " * 0x2000 + b"\r\n")
                sent += 0x2000
                try:
                    reply = raw.recv(4096)
                except socket.timeout:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw.settimeout(30)
        while b"\r\n\r\n" not in reply:
            reply += raw.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    assert sent < 4 * BODY_LIMIT  # it did not wait for the whole body
    # a chunked body under the limit is read whole
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as raw:
        body = chat()
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                    + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                    + b"".join(b"%x\r\n%s\r\n" % (len(body[k:k + 7]), body[k:k + 7]) for k in range(0, len(body), 7))
                    + b"0\r\n\r\n")
        reply = b""
        while piece := raw.recv(65536):
            reply += piece
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    deadline = time.monotonic() + 30  # the worker frees a slot just after the answer is sent
    while call(server, "GET", "/health", key=None)[1]["unfinished_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert call(server, "GET", "/health", key=None)[1]["unfinished_requests"] == 0
    assert "Traceback" not in server.log()


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as raw:
        started = time.monotonic()
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                    + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")  # then nothing more
        reply = b""
        while piece := raw.recv(65536):  # ends when the server closes the connection
            reply += piece
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_TIMEOUT - 0.5 < waited < BODY_TIMEOUT + 20


def test_the_prompt_cache_options_keep_their_older_prefix_cache_names():
    from corematching.apps.serve.cli import make_parser

    args = make_parser().parse_args(["--no-prefix-cache", "--prefix-cache-size", "3", "--prefix-cache-bytes", "2M"])
    assert (args.prompt_cache, args.prompt_cache_size, args.prompt_cache_bytes) == (False, 3, 2 * 2**20)
    args = make_parser().parse_args(["--no-prompt-cache", "--prompt-cache-size", "5"])
    assert (args.prompt_cache, args.prompt_cache_size, args.prompt_cache_bytes) == (False, 5, 2**30)
    assert make_parser().parse_args([]).prompt_cache is True


def test_a_server_with_a_method_that_needs_calibration_refuses_to_start(capsys):
    from corematching.apps.serve.cli import main

    assert main(["--method", "teal", "--model", "no-such-model"]) == 2
    assert "needs calibration" in capsys.readouterr().err


@pytest.mark.parametrize("batching, option", [("continuous", "--max-wait-ms"), ("static", "--join-wait-steps")])
def test_an_option_of_the_other_batching_is_reported_not_silently_ignored(caplog, batching, option):
    from corematching.apps.serve.cli import main

    value = "50" if option == "--max-wait-ms" else "3"
    with caplog.at_level("WARNING", logger="corematching.apps.serve"):  # the start stops at TEAL's refusal
        assert main(["--batching", batching, option, value, "--method", "teal", "--model", "no-such-model"]) == 2
    assert any(option in record.getMessage() and "ignored" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="corematching.apps.serve"):
        main(["--batching", batching, "--method", "teal", "--model", "no-such-model"])
    assert not any("ignored" in record.getMessage() for record in caplog.records)
