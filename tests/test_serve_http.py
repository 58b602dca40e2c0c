"""`corematching serve` end to end: one server (the bundled model) for the module, started on a free loopback
port, driven by the official `openai` client and, for the web page, by a real headless Chromium (Debian's
chromium + chromium-driver through Selenium)."""

import base64
import http.client
import json
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from corematching.apps.serve.process import ServerProcess  # noqa: E402
from corematching.zoo import data  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MODEL = "evqa-smollm2"
MAX_QUEUE = 6
MAX_BATCH = 4


@pytest.fixture(scope="module", params=["static", "continuous"])
def server(tmp_path_factory, request):
    allowed = tmp_path_factory.mktemp("allowed")
    paths = data.image_paths("test")
    (allowed / "shape.png").write_bytes(open(paths[0], "rb").read())
    (allowed / "broken.png").write_bytes(b"not an image at all")
    (allowed / "escape.png").symlink_to(paths[1])  # a link inside the allowed directory to a file outside it
    arguments = ["--batching", request.param, "--max-batch-size", str(MAX_BATCH), "--max-wait-ms", "300",
                 "--max-queue", str(MAX_QUEUE),
                 "--allowed-image-dir", str(allowed), "--prompt-cache", "--default-max-tokens", "8",
                 "--threads", "1"]
    process = ServerProcess(arguments).start()
    process.allowed = allowed
    process.batching = request.param
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def image_url(image_id: int) -> str:
    with open(data.image_paths("test")[image_id], "rb") as handle:
        return "data:image/png;base64," + base64.b64encode(handle.read()).decode()


def question_for(image_id: int):
    return data.by_image(data.questions("test"))[image_id][0]


def messages(url: str, text: str) -> list:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def ask(client, image_id: int, **options):
    q = question_for(image_id)
    return client.chat.completions.create(model=MODEL, messages=messages(image_url(image_id), q.question), **options)


def post_raw(server, body: bytes, path="/v1/chat/completions"):
    request = urllib.request.Request(server.base_url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert server.get("/health")["status"] == "ok"


def test_chat_with_an_image_answers_and_reports_usage(client):
    q = question_for(0)
    reply = ask(client, 0, max_tokens=8)
    assert reply.choices[0].message.content == q.answer
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage.model_dump()
    assert usage["visual_tokens"] == 64 and usage["visual_tokens_kept"] == 16  # the default: CoreMatching 25%
    assert usage["prefill_time_s"] > 0 and usage["decode_time_s"] >= 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    extension = reply.model_extra["corematching"]
    assert extension["method"] == "corematching" and extension["grid"] == [8, 8]
    assert len(extension["kept_patches"][0]) == 16


def test_streaming_gives_the_same_text_and_usage(client):
    whole = ask(client, 1, max_tokens=8).choices[0].message.content
    chunks = list(ask(client, 1, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole == question_for(1).answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump()["visual_tokens_kept"] == 16


def test_text_only_request_runs_and_stops_at_max_tokens(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                           max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    assert reply.usage.model_dump()["visual_tokens"] == 0


def test_stop_sequence_cuts_the_answer(client):
    prompt = [{"role": "user", "content": "Count: 1, 2, 3,"}]
    full = client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=12,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 4
    stop = full[2:4]
    cut = client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=12, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_extension_field_chooses_the_method_per_request(client):
    dense = ask(client, 2, extra_body={"corematching": {"method": "dense"}})
    assert dense.usage.model_dump()["visual_tokens_kept"] == 64
    uniform = ask(client, 2, extra_body={"corematching": {"method": "uniform", "token_budget": 8}})
    assert uniform.usage.model_dump()["visual_tokens_kept"] == 8
    refined = ask(client, 2, extra_body={"corematching": {"token_budget": 4}})  # the default method, one field changed
    assert refined.usage.model_dump()["visual_tokens_kept"] == 4
    assert refined.model_extra["corematching"]["settings"]["token_budget"] == 4


@pytest.mark.parametrize("field, param", [
    ({"method": "corematching", "rho": 2}, "corematching.rho"),
    ({"method": "corematching", "token_budget": 0}, "corematching.token_budget"),
    ({"method": "random", "beta": 0.5}, "corematching.beta"),
    ({"method": "nope"}, "corematching.method"),
    ("corematching", "corematching"),
])
def test_invalid_extension_fields_are_refused(client, field, param):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, 0, extra_body={"corematching": field})
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


def test_bad_requests_get_openai_errors(server, client):
    status, body = post_raw(server, b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    cases = [
        (dict(messages=messages("data:image/png;base64,aGVsbG8=", "what?")), "invalid_image"),  # undecodable
        (dict(messages=messages("data:image/png;base64,@@@", "what?")), "invalid_image"),  # not base64
        (dict(messages=messages(image_url(0), "what?"), tools=[{"type": "function", "function": {"name": "f"}}]),
         "unsupported_parameter"),
        (dict(messages=messages(image_url(0), "what?"), logprobs=True), "unsupported_parameter"),
        (dict(messages=messages(image_url(0), "what?"), n=2), "unsupported_parameter"),
        (dict(messages=messages(image_url(0), "what?"), max_tokens=10**6), "context_length_exceeded"),
        (dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(0)}},
            {"type": "image_url", "image_url": {"url": image_url(1)}},
            {"type": "text", "text": "which?"}]}]), "too_many_images"),
        (dict(messages=messages("https://example.com/cat.png", "what?")), "unsupported_image_url"),
        (dict(messages=messages("/etc/passwd", "what?")), "image_path_not_allowed"),
        (dict(messages=messages("../../../../etc/hostname", "what?")), "image_path_not_allowed"),
        (dict(messages=messages("escape.png", "what?")), "image_path_not_allowed"),
        (dict(messages=messages("missing.png", "what?")), "image_not_found"),
        (dict(messages=messages("broken.png", "what?")), "invalid_image"),
    ]
    for options, code in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, **options)
        assert caught.value.status_code == 400
        assert caught.value.body["code"] == code, (options.keys(), caught.value.body)
    status, body = post_raw(server, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "frequency_penalty": 0.5, "bogus": 1}).encode())
    assert status == 400 and body["error"]["param"] == "bogus"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10**9))  # announced; refused before the body is read
    connection.endheaders(b"{}")
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    status, body = post_raw(server, b"{}", path="/v1/nothing")
    assert status == 404 and "error" in body
    # an allowed file works, and a failing request never took the server down
    allowed = client.chat.completions.create(model=MODEL, messages=messages("shape.png", question_for(0).question))
    assert allowed.choices[0].message.content == question_for(0).answer


def test_batching_never_changes_an_answer(server, client):
    jobs = [dict(image_id=i) for i in range(3)] + [dict(image_id=3, temperature=1.0, top_p=0.9, seed=7, max_tokens=6)]
    jobs += [dict(image_id=4, extra_body={"corematching": {"method": "random", "token_budget": 8, "seed": 3}})]

    def run(job):
        job = dict(job)
        image_id = job.pop("image_id")
        reply = ask(client, image_id, **job)
        return reply.choices[0].message.content, reply.usage.model_dump()["batch_size"]

    alone = [run(job)[0] for job in jobs]
    batches_before = server.get("/health")["batches_run"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert [text for text, _ in together] == alone
    assert max(size for _, size in together) > 1, "the concurrent requests were not batched"
    if server.batching == "static":  # one generate call per batch (continuous counts decode steps)
        assert server.get("/health")["batches_run"] - batches_before < len(jobs)


def test_a_seed_fixes_sampled_tokens(client):
    prompt = [{"role": "user", "content": "Write one sentence about the sea."}]
    first, second, other = (client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=8, temperature=1.0,
                                                           seed=seed, extra_body={"ignore_eos": True})
                            .choices[0].message.content for seed in (5, 5, 6))
    assert first == second
    assert other != first  # could coincide by chance; for this prompt it does not


def test_a_repeated_image_and_prompt_reuses_the_prefill(client):
    first = ask(client, 5, max_tokens=8)
    second = ask(client, 5, max_tokens=8)
    assert first.usage.model_dump()["prompt_cache_hit"] is False
    assert second.usage.model_dump()["prompt_cache_hit"] is True
    assert second.usage.model_dump()["prefix_cache_hit"] is True  # the field's older name
    assert second.choices[0].message.content == first.choices[0].message.content == question_for(5).answer
    assert second.usage.model_dump()["visual_tokens_kept"] == first.usage.model_dump()["visual_tokens_kept"]


def test_full_queue_answers_429_and_disconnect_frees_the_slot(server, client):
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    # a streaming client that goes away after the first words
    stream = client.chat.completions.create(model=MODEL, messages=story, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while server.get("/health")["unfinished_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.get("/health")["unfinished_requests"] == 0  # 400 tokens would take far longer than this

    statuses = []

    def long_request(_):
        try:
            # long enough that every request arrives before the first batch is done
            client.chat.completions.create(model=MODEL, messages=story, max_tokens=12, extra_body={"ignore_eos": True})
            statuses.append(200)
        except openai.RateLimitError as error:
            assert error.body["code"] == "queue_full"
            statuses.append(429)

    with ThreadPoolExecutor(MAX_QUEUE + 4) as pool:
        list(pool.map(long_request, range(MAX_QUEUE + 4)))
    assert statuses.count(429) >= 1 and statuses.count(200) >= MAX_QUEUE - MAX_BATCH


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (`make test` installs them with apt-get when run "
                    "as root)")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_answers_an_uploaded_image_and_shows_kept_patches(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = data.by_image(data.questions("test"))[0][0]
    wait = WebDriverWait(browser, 90)
    browser.get(server.base_url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#examples img")) > 0  # images to pick from
    browser.find_element(By.ID, "file").send_keys(str(data.image_paths("test")[0]))
    wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
    browser.find_element(By.ID, "question").send_keys(question.question)
    browser.find_element(By.ID, "ask").click()
    sparse_answer = "#corematching .answer"
    finished = ("done", "error")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, sparse_answer).get_attribute("data-state") in finished)
    assert browser.find_element(By.ID, "status").text == ""
    assert browser.find_element(By.CSS_SELECTOR, "#dense .answer").text == question.answer
    assert browser.find_element(By.CSS_SELECTOR, sparse_answer).text == question.answer
    dense_stats = browser.find_element(By.CSS_SELECTOR, "#dense .stats").text
    sparse_stats = browser.find_element(By.CSS_SELECTOR, "#corematching .stats").text
    assert "visual tokens 64/64" in dense_stats and "visual tokens 16/64" in sparse_stats
    assert "prefill" in dense_stats and "prefill" in sparse_stats
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.get_attribute("data-kept") == "16" and overlay.get_attribute("data-total") == "64"
    # the overlay really covers the removed patches: compare the canvas with the bare image drawn the same way
    changed = browser.execute_script("""
        const c = document.getElementById('overlay'), bare = document.createElement('canvas');
        bare.width = c.width; bare.height = c.height;
        const b = bare.getContext('2d'); b.imageSmoothingEnabled = false;
        b.drawImage(document.getElementById('preview'), 0, 0, c.width, c.height);
        const x = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const y = b.getImageData(0, 0, c.width, c.height).data;
        let changed = 0;
        for (let i = 0; i < x.length; i += 4) { if (Math.abs(x[i] - y[i]) > 30) changed++; }
        return changed / (c.width * c.height);""")
    assert 0.6 < changed < 0.9  # 48 of 64 patches darkened (75%), plus the kept patches' outlines


def test_shutdown_lets_an_accepted_request_finish(server, client):
    """Last in the module: SIGTERM while a request runs; it is answered, then the server exits cleanly."""
    result = {}

    def request():
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story."}],
                                               max_tokens=20, extra_body={"ignore_eos": True})
        result["reply"] = reply

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(1.0)
    server.terminate()
    thread.join(60)
    assert result["reply"].choices[0].finish_reason == "length"
    # uvicorn exits by re-raising SIGTERM once it has shut down cleanly
    assert server.process.wait(60) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log()
