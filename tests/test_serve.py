"""`rapiddiff serve`: the app on the tiny SD checkpoint (CPU), through FastAPI's TestClient, a uvicorn server in a
thread (client disconnects) and the command in a subprocess (SIGTERM), all on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

import httpx  # noqa: E402
from conftest import PIPELINE_ATOL, seeded  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import rapiddiff  # noqa: E402
from rapiddiff.serve.app import create_app  # noqa: E402
from rapiddiff.serve.batcher import ServeSettings  # noqa: E402

ENDPOINT = "/v1/images/generations"
STEPS = 2
# Served images are PNGs (uint8): the pipelines' tolerance plus half a level of rounding.
PNG_ATOL = PIPELINE_ATOL + 0.5 / 255


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    pipe = rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Wrapped:
    """The pipeline, with `before(kwargs)` run before each call (a delay, a simulated out-of-memory); counts calls."""

    def __init__(self, pipe, before=None):
        self.pipe, self.before, self.calls = pipe, before, []

    def __call__(self, **kwargs):
        self.calls.append(len(kwargs["prompt"]))
        if self.before is not None:
            self.before(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def sleeping(seconds: float):
    return lambda kwargs: time.sleep(seconds)


def client_for(pipe, **settings) -> TestClient:
    return TestClient(create_app(pipe, "tiny", ServeSettings(**settings)))


def body(prompt="a red cube", **kwargs) -> dict:
    return {"prompt": prompt, "num_inference_steps": STEPS, **kwargs}


def decode(item: dict) -> np.ndarray:
    import PIL.Image

    with PIL.Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def direct(pipe, prompt, seed, *, scheduler=None, **kwargs) -> np.ndarray:
    """The image a direct pipeline call gives for one prompt and seed."""
    if scheduler is not None:
        pipe = type(pipe).from_pipe(pipe, scheduler=getattr(rapiddiff, scheduler).from_config(pipe.scheduler.config))
    args = dict(num_inference_steps=STEPS, output_type="np") | kwargs
    return pipe(prompt=prompt, generator=seeded(seed), **args).images[0]


def direct_for(pipe, request: dict, k: int) -> np.ndarray:
    """The direct call's image k of a request body (the settings these tests vary)."""
    return direct(
        pipe,
        request["prompt"],
        request["seed"] + k,
        negative_prompt=request.get("negative_prompt"),
        guidance_scale=request.get("guidance_scale", 7.5),
        scheduler={"euler_a": "EulerAncestralDiscreteScheduler"}.get(request.get("scheduler")),
    )


def metric(client: TestClient, name: str, labels: dict | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def post_all(client: TestClient, bodies: list[dict]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post(ENDPOINT, json=b), bodies))


# --- images: batched requests give the direct call's images for their seeds -------------------------------------------
def test_concurrent_requests_give_the_direct_images_of_their_seeds(pipe):
    requests = [
        body("a red cube", seed=1),
        body("a blue sphere", seed=7, n=2),
        body("a green cone", seed=3, negative_prompt="blurry"),
        body("a red cube", seed=5, guidance_scale=3.0),  # another key: its own call
        body("a cat", seed=11, scheduler="euler_a"),  # stochastic steps: each image draws from its own generator
        body("a dog", seed=12, scheduler="euler_a"),
    ]
    with client_for(pipe, max_batch_size=4, batch_wait_ms=500) as client:
        responses = post_all(client, requests)
        batches = metric(client, "rapiddiff_batch_size_count")
        images = metric(client, "rapiddiff_images_generated_total")
    assert [r.status_code for r in responses] == [200] * len(requests)
    assert images == 7
    assert batches < len(requests), "no two requests were batched together"
    for request, response in zip(requests, responses):
        answer = response.json()
        assert set(answer) == {"created", "data"} and len(answer["data"]) == request.get("n", 1)
        for k, item in enumerate(answer["data"]):
            assert item["seed"] == request["seed"] + k
            np.testing.assert_allclose(decode(item), direct_for(pipe, request, k), rtol=0, atol=PNG_ATOL)


def test_another_scheduler_keeps_the_pipeline_s_progress_bar_setting(pipe, capfd):
    with client_for(pipe) as client:  # the fixture's pipeline shows no bar; neither does its view with Euler a
        assert client.post(ENDPOINT, json=body(seed=0, scheduler="euler_a")).status_code == 200
    assert "it/s]" not in capfd.readouterr().err


def test_padding_to_compiled_sizes_keeps_the_images(pipe):
    """With padding (--compile), 3 images run as a call of 4; the dummy image is dropped."""
    wrapped = Wrapped(pipe)
    requests = [body("a red cube", seed=1), body("a blue sphere", seed=2, n=2)]
    with client_for(wrapped, max_batch_size=4, batch_wait_ms=500, pad_to_compiled=True) as client:
        responses = post_all(client, requests)
        assert metric(client, "rapiddiff_compiled_shapes_total") == len(wrapped.calls)
    assert all(size in (1, 2, 4) for size in wrapped.calls) and 4 in wrapped.calls
    for request, response in zip(requests, responses):
        for k, item in enumerate(response.json()["data"]):
            expected = direct(pipe, request["prompt"], request["seed"] + k)
            np.testing.assert_allclose(decode(item), expected, rtol=0, atol=PNG_ATOL)


@pytest.mark.compile
@pytest.mark.slow  # a CPU compile: 40 s to 2 min on two busy cores
def test_compiled_pipeline_pads_to_one_shape(pipe, tiny_sd_dir):
    """--compile: 1 + 2 images batched, then 3 images, each run as a call of 4: one compile; the eager images."""
    compiled = rapiddiff.compile_pipeline(rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir))
    compiled.set_progress_bar_config(disable=True)
    requests = [body("a red cube", seed=1), body("a blue sphere", seed=2, n=2)]
    with client_for(compiled, max_batch_size=4, batch_wait_ms=1000, pad_to_compiled=True) as client:
        first = post_all(client, requests)
        again = client.post(ENDPOINT, json=body("a green cone", seed=4, n=3))
        assert metric(client, "rapiddiff_compiled_shapes_total") == 1
    for request, response in zip([*requests, body("a green cone", seed=4, n=3)], [*first, again]):
        for k, item in enumerate(response.json()["data"]):
            np.testing.assert_allclose(
                decode(item), direct(pipe, request["prompt"], request["seed"] + k), atol=PNG_ATOL
            )


def test_batch_settings_pad_to_powers_of_two():
    settings = ServeSettings(max_batch_size=6, pad_to_compiled=True)
    assert [settings.padded_size(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert ServeSettings(max_batch_size=6).padded_size(3) == 3
    with pytest.raises(ValueError, match="max_queue"):
        ServeSettings(max_queue=0)


# --- says no ---------------------------------------------------------------------------------------------------------
BAD_FIELDS = [
    (dict(prompt=""), 422, "prompt", "at least 1"),
    (dict(size="30x32"), 422, "size", "multiple of 8"),
    (dict(size="big"), 422, "size", "WIDTHxHEIGHT"),
    (dict(n=0), 422, "n", "greater than or equal to 1"),
    (dict(n=9), 400, "n", "allowed: 1..4"),
    (dict(response_format="url"), 400, "response_format", "allowed: 'b64_json'"),
    (dict(model="dall-e-3"), 400, "model", "allowed: 'tiny'"),
    (dict(num_inference_steps=0), 422, "num_inference_steps", "greater than or equal to 1"),
    (dict(guidance_scale=-1), 422, "guidance_scale", "greater than or equal to 0"),
    (dict(guidance_scale="high"), 422, "guidance_scale", "valid number"),
    (dict(guidance_scale="nan"), 422, "guidance_scale", "finite number"),
    (dict(seed=-3), 422, "seed", "greater than or equal to 0"),
    (dict(seed=2**64 - 1, n=2), 400, "seed", "must be in [0, "),
    (dict(scheduler="fastest"), 422, "scheduler", "allowed: pndm"),
    (dict(quality="hd"), 422, "quality", "unknown field"),
]


@pytest.mark.parametrize(
    "fields, status, param, fragment", BAD_FIELDS, ids=[b[2] + str(i) for i, b in enumerate(BAD_FIELDS)]
)
def test_bad_fields_are_refused_naming_the_field(pipe, fields, status, param, fragment):
    wrapped = Wrapped(pipe)
    with client_for(wrapped) as client:
        response = client.post(ENDPOINT, json=body(**fields))
        assert metric(client, "rapiddiff_rejections_total", {"reason": "invalid_request"}) == 1
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert wrapped.calls == []  # refused before it was queued


def test_a_body_that_is_not_json_is_refused(pipe):
    with client_for(pipe) as client:
        for content in (b"{not json", b""):
            response = client.post(ENDPOINT, content=content, headers={"Content-Type": "application/json"})
            assert response.status_code == 422 and "must be a JSON object" in response.json()["error"]["message"]


def test_a_flood_gets_429_with_retry_after(pipe):
    wrapped = Wrapped(pipe, sleeping(0.3))
    with client_for(wrapped, max_batch_size=1, batch_wait_ms=0, max_queue=2) as client:
        responses = post_all(client, [body(seed=i) for i in range(10)])
        refused = [r for r in responses if r.status_code == 429]
        assert metric(client, "rapiddiff_rejections_total", {"reason": "queue_full"}) == len(refused)
    assert refused and all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
    assert all(r.status_code == 200 for r in responses if r not in refused)  # what was accepted was answered
    assert len(wrapped.calls) == len(responses) - len(refused)


def test_request_timeout_gives_504_and_skips_queued_work(pipe):
    wrapped = Wrapped(pipe, sleeping(1.0))
    with client_for(wrapped, max_batch_size=1, batch_wait_ms=0, request_timeout=0.5) as client:
        responses = post_all(client, [body(seed=1), body(seed=2)])
        assert client.app.state.batcher.wait_idle(10)
        assert metric(client, "rapiddiff_rejections_total", {"reason": "timeout"}) == 2
    assert [r.status_code for r in responses] == [504, 504]
    assert "--request-timeout 0.5" in responses[0].json()["error"]["message"]
    assert len(wrapped.calls) == 1  # the second was never started


def out_of_memory_above(size: int, always: str | None = None):
    def before(kwargs):
        if len(kwargs["prompt"]) > size or any(always and always in p for p in kwargs["prompt"]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return before


def test_out_of_memory_splits_the_batch_and_retries(pipe):
    wrapped = Wrapped(pipe, out_of_memory_above(2))
    requests = [body(f"prompt {i}", seed=i) for i in range(4)]
    with client_for(wrapped, max_batch_size=4, batch_wait_ms=500) as client:
        responses = post_all(client, requests)
    assert [r.status_code for r in responses] == [200] * 4
    assert wrapped.calls[0] > 2 and all(size <= 2 for size in wrapped.calls[1:])
    for request, response in zip(requests, responses):
        expected = direct(pipe, request["prompt"], request["seed"])
        np.testing.assert_allclose(decode(response.json()["data"][0]), expected, rtol=0, atol=PNG_ATOL)


def test_out_of_memory_at_the_smallest_size_is_503_and_the_server_stays_up(pipe):
    wrapped = Wrapped(pipe, out_of_memory_above(4, always="huge"))
    with client_for(wrapped, max_batch_size=2, batch_wait_ms=0) as client:
        response = client.post(ENDPOINT, json=body("a huge castle"))
        assert response.status_code == 503 and response.json()["error"]["code"] == "out_of_memory"
        assert "retry later" in response.json()["error"]["message"]
        assert client.post(ENDPOINT, json=body("a small house")).status_code == 200
        assert client.get("/ready").status_code == 200
        assert metric(client, "rapiddiff_rejections_total", {"reason": "out_of_memory"}) == 1


@contextlib.contextmanager
def running(app):
    """The app on a uvicorn server in a thread, on 127.0.0.1 and a free port: yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_disconnected_client_s_queued_work_is_dropped(pipe):
    """Through a real uvicorn server on 127.0.0.1 (TestClient cannot hang up): the first request holds the worker,
    the second one's client gives up while it is queued, and its work never runs."""
    wrapped = Wrapped(pipe, sleeping(2.5))
    app = create_app(wrapped, "tiny", ServeSettings(max_batch_size=1, batch_wait_ms=0))
    with running(app) as url, ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, url + ENDPOINT, json=body(seed=1), timeout=30)
        time.sleep(0.5)  # the first is running
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + ENDPOINT, json=body(seed=2), timeout=0.5)
        assert first.result().status_code == 200
        assert app.state.batcher.wait_idle(10)
        text = httpx.get(url + "/metrics").text
    assert 'rapiddiff_rejections_total{reason="client_disconnected"} 1.0' in text
    assert wrapped.calls == [1]  # the second request's work was dropped


# --- endpoints -------------------------------------------------------------------------------------------------------
def test_health_ready_metrics(pipe):
    from prometheus_client.parser import text_string_to_metric_families

    with client_for(pipe) as client:
        assert client.get("/health").json() == {"status": "ok", "model": "tiny", "queued_images": 0}
        assert client.get("/ready").json() == {"ready": True}
        assert client.post(ENDPOINT, json=body(seed=0)).status_code == 200
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        client.app.state.batcher.drain()
        assert client.get("/ready").status_code == 503
        refused = client.post(ENDPOINT, json=body(seed=0))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert {"rapiddiff_queue_depth", "rapiddiff_batch_size", "rapiddiff_request_latency_seconds",
            "rapiddiff_images_generated", "rapiddiff_rejections"} <= set(families)  # fmt: skip
    assert families["rapiddiff_queue_depth"].type == "gauge"
    assert families["rapiddiff_batch_size"].type == "histogram"
    assert families["rapiddiff_request_latency_seconds"].type == "histogram"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("rapiddiff_images_generated_total", ())] == 1
    assert samples[("rapiddiff_request_latency_seconds_count", ())] == 1
    assert samples[("rapiddiff_rejections_total", (("reason", "queue_full"),))] == 0
    # every line is a comment or `name{labels} value` (the text format, strictly)
    line = re.compile(
        r'^(# (HELP|TYPE) .*|[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? \S+)$'
    )
    assert all(line.match(text) for text in response.text.splitlines())


def test_the_page(pipe):
    with client_for(pipe) as client:
        response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert '"/v1/images/generations"' in html and "fetch(ENDPOINT" in html and "b64_json" in html
    for field in ('id="prompt"', 'id="size"', 'id="steps"', 'id="seed"', 'id="result"', 'id="status"'):
        assert field in html
    assert 'value="32x32"' in html and '<code id="model">tiny</code>' in html


HARNESS = """<!doctype html><html><body><iframe id="page" src="/" width="700" height="700"></iframe><pre id="out"></pre>
<script>
const frame = document.getElementById("page");
frame.onload = () => {
  const doc = frame.contentDocument;
  doc.getElementById("steps").value = "2";
  doc.getElementById("seed").value = "5";
  doc.getElementById("go").click();
  const poll = setInterval(() => {
    if (!doc.body.dataset.state) return;
    clearInterval(poll);
    const image = doc.getElementById("result");
    document.getElementById("out").textContent =
      `state=${doc.body.dataset.state} shown=${!image.hidden} width=${image.naturalWidth} status=${doc.getElementById("status").textContent}`;
  }, 50);
};
</script></body></html>"""


def test_the_page_shows_an_image_in_headless_chromium(pipe, tmp_path):
    """The page in headless Chromium: a harness page (this test's, same origin) fills the form in an iframe, clicks
    Generate and writes what the page shows; a screenshot must hold the image's pixels."""
    import PIL.Image
    from fastapi.responses import HTMLResponse

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium on this machine")
    app = create_app(pipe, "tiny", ServeSettings())
    app.add_api_route("/harness", lambda: HTMLResponse(HARNESS))
    with running(app) as url:
        browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=720,760",
                   f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000"]  # fmt: skip
        run = dict(capture_output=True, text=True, timeout=120)
        dom = subprocess.run([*browser, "--dump-dom", url + "/harness"], **run)
        shot = subprocess.run([*browser, f"--screenshot={tmp_path / 'page.png'}", url + "/harness"], **run)
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    report = re.search(r'<pre id="out">([^<]*)</pre>', dom.stdout).group(1)
    assert report.startswith("state=done shown=true width=32 status=done in"), report
    with PIL.Image.open(tmp_path / "page.png") as screenshot:
        pixels = np.asarray(screenshot.convert("RGB")).astype(int)
    # the page itself is black, grey and white; the image (256 x 256 on screen) is random colours
    colourful = ((pixels.max(-1) - pixels.min(-1)) > 40).sum()
    assert colourful > 128 * 128, f"the screenshot shows no generated image ({colourful} colourful pixels)"


# --- the command -----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~25 s: a subprocess imports torch and loads the model
def test_sigterm_drains_in_flight_requests(tiny_sd_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    env = os.environ | {"PYTHONPATH": str(Path(rapiddiff.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rapiddiff", "serve", "--model", str(tiny_sd_dir), "--host", "127.0.0.1",
               "--port", str(port), "--max-batch-size", "1", "--batch-wait-ms", "0"]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the server exited: {log.seek(0) or log.read()}"
            assert time.monotonic() < deadline, "the server did not get ready"
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        slow = body(size="64x64", num_inference_steps=30)
        with ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(httpx.post, url + ENDPOINT, json=slow | {"seed": i}, timeout=120) for i in range(3)]
            # wait until the first request runs and the other two are queued: all three are accepted
            while "rapiddiff_queue_depth 2.0" not in httpx.get(url + "/metrics").text:
                assert time.monotonic() < deadline, "the requests did not arrive"
                time.sleep(0.05)
            server.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(url + "/ready").status_code == 503
            refused = httpx.post(url + ENDPOINT, json=body(seed=9), timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert [a.result().status_code for a in answers] == [200] * 3  # accepted work all finished
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


def test_the_command_checks_before_serving(tiny_upscaler_dir, tmp_path, capsys):
    from rapiddiff.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--max-batch-size", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--request-timeout", "inf"])
    assert "must be a finite number > 0" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "70000"]) == 2
    assert "--port 70000 must be in [1, 65535]" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing"), "--replicas", "2"]) == 2
    assert "--replicas 2 is for --engine ray" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "rapiddiff serve: error:" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_upscaler_dir)]) == 2
    assert "loads as StableDiffusionUpscalePipeline" in capsys.readouterr().err


def test_the_pipeline_setup_loads_checks_and_prepares(pipe, tiny_sd_dir, tiny_upscaler_dir):
    """What the command and every Ray replica serve: the checkpoint on this process's device, without progress bars."""
    from rapiddiff.serve.setup import PipelineSetup

    served = PipelineSetup(str(tiny_sd_dir)).load()
    assert type(served) is rapiddiff.StableDiffusionPipeline and served.device.type == "cpu"
    assert served._progress_bar_config == {"disable": True}
    np.testing.assert_array_equal(direct(served, "a red cube", 3), direct(pipe, "a red cube", 3))
    with pytest.raises(ValueError, match="loads as StableDiffusionUpscalePipeline"):
        PipelineSetup(str(tiny_upscaler_dir)).check()


# --- the Ray Serve engine --------------------------------------------------------------------------------------------
RAY_REQUESTS = [
    body("a red cube", seed=1),
    body("a blue sphere", seed=7, n=2),
    body("a green cone", seed=3, negative_prompt="blurry"),
    body("a cat", seed=11, scheduler="euler_a"),
]
RAY_BAD = [body(quality="hd"), body(n=9), body(model="dall-e-3"), body(size="30x32")]
RAY_IN_FLIGHT = body("a slow castle", seed=5, n=4, size="64x64", num_inference_steps=60)  # 5-10 s of work


def _drive_ray_server(url: str, seen: dict, exited: threading.Event) -> None:
    """The client side of the Ray test, in a thread while the command runs in the main one: once the replicas are
    ready, the requests, the bad bodies and one slow request in flight when SIGTERM is sent to this process (the
    command's handler: only sent once it is installed, so pytest itself is never terminated)."""
    from ray import serve

    handler = signal.getsignal(signal.SIGTERM)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline and not exited.is_set(), "the replicas did not get ready"
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        seen["ready_after"] = time.monotonic()  # the proxy routes once one replica runs: wait for them all
        while (application := serve.status().applications["rapiddiff"]).status != "RUNNING":
            assert time.monotonic() < deadline, f"the replicas did not all start: {application}"
            time.sleep(0.5)
        seen["running_after"] = time.monotonic()
        seen["replicas"] = {name: d.replica_states for name, d in application.deployments.items()}
        with ThreadPoolExecutor(len(RAY_REQUESTS)) as pool:
            seen["answers"] = list(pool.map(lambda b: httpx.post(url + ENDPOINT, json=b, timeout=120), RAY_REQUESTS))
        seen["bad"] = [httpx.post(url + ENDPOINT, json=b, timeout=30) for b in RAY_BAD]

        def answered_at(request: dict) -> tuple[httpx.Response, float]:
            return httpx.post(url + ENDPOINT, json=request, timeout=120), time.monotonic()

        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(answered_at, RAY_IN_FLIGHT)
            time.sleep(2.0)  # routed to a replica and running
            seen["sigterm_at"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            seen["in_flight"], seen["in_flight_at"] = in_flight.result()
    except BaseException as error:  # reported by the test
        seen["error"] = error
    finally:
        if "sigterm_at" not in seen and "ready_after" in seen and signal.getsignal(signal.SIGTERM) is not handler:
            os.kill(os.getpid(), signal.SIGTERM)  # stop the command after a failure


@pytest.mark.dist  # a local Ray, 2 replicas: ~30 s on 2 quiet cores (Ray starts in ~5 s, each replica loads torch)
def test_ray_engine_serves_the_same_app_on_replicas(pipe, tiny_sd_dir):
    """`rapiddiff serve --engine ray --replicas 2` on a local Ray: both replicas run; requests (batched on either
    replica) give the direct-call images of their seeds; bad bodies get the uvicorn server's errors, byte for byte;
    SIGTERM lets the request in flight finish, then the command exits 0 with Ray shut down and its signal handlers
    put back."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'rapiddiff[ray]')")
    import ray

    from rapiddiff.cli import main

    port, seen = free_port(), {}
    url = f"http://127.0.0.1:{port}"
    handler = signal.getsignal(signal.SIGTERM)
    exited = threading.Event()
    client = threading.Thread(target=_drive_ray_server, args=(url, seen, exited), daemon=True)
    start = time.monotonic()
    client.start()
    code = main(["serve", "--engine", "ray", "--replicas", "2", "--model", str(tiny_sd_dir), "--port", str(port),
                 "--max-batch-size", "4", "--batch-wait-ms", "300"])  # fmt: skip
    stopped = time.monotonic()
    exited.set()
    client.join(60)
    if "error" in seen:
        raise seen["error"]
    print(
        f"ray: first replica ready in {seen['ready_after'] - start:.1f} s, all in {seen['running_after'] - start:.1f} "
        f"s; stopped {stopped - seen['sigterm_at']:.1f} s after SIGTERM"
    )
    assert code == 0 and not ray.is_initialized()
    assert signal.getsignal(signal.SIGTERM) is handler
    assert seen["replicas"] == {"rapiddiff": {"RUNNING": 2}}
    for request, response in zip(RAY_REQUESTS, seen["answers"]):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [item["seed"] for item in data] == [request["seed"] + k for k in range(request.get("n", 1))]
        for k, item in enumerate(data):
            np.testing.assert_allclose(decode(item), direct_for(pipe, request, k), rtol=0, atol=PNG_ATOL)
    with TestClient(create_app(pipe, str(tiny_sd_dir), ServeSettings(max_batch_size=4))) as local:
        for request, response in zip(RAY_BAD, seen["bad"]):
            same = local.post(ENDPOINT, json=request)
            assert (response.status_code, response.json()) == (same.status_code, same.json())
    assert seen["in_flight"].status_code == 200 and len(seen["in_flight"].json()["data"]) == 4
    assert seen["sigterm_at"] < seen["in_flight_at"] < stopped  # it was in flight at SIGTERM, answered before the exit


def test_the_ray_engine_checks_the_model_before_ray_starts(tiny_upscaler_dir, tmp_path, capsys):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'rapiddiff[ray]')")
    import ray

    from rapiddiff.cli import main

    assert main(["serve", "--engine", "ray", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--engine", "ray", "--model", str(tiny_upscaler_dir)]) == 2
    assert "loads as StableDiffusionUpscalePipeline" in capsys.readouterr().err
    assert not ray.is_initialized()
