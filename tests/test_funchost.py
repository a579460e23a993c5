"""function_app.py served by the real Azure Functions Python worker, in HTTP-streaming mode, as `func start` would.

`../shared/tools/funchost` (beside the clone, outside the project) stands in for the .NET host, which cannot
be installed here: it starts the real worker, has it index function_app.py, routes each request as the host
does and forwards it to the worker's own web server. These tests are skipped where it is absent. Its first
start builds a venv (about a minute), so the fixture's start-up bound is generous; after that one start serves
every test of this module.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pathspec
import pytest

from lb.sim import Servers, SimBackend, free_port
from tests.conftest import API_VERSION

ROOT = Path(__file__).resolve().parents[1]
FUNCHOST = ROOT.parent / "shared" / "tools" / "funchost"
START_SECONDS = 300  # the first start builds the worker's venv
KEY = "funchost-client-key"
MESSAGES = [{"role": "user", "content": "hi"}]

pytestmark = [
    pytest.mark.skipif(not (FUNCHOST / "start").exists(), reason="../shared/tools/funchost is absent"),
    pytest.mark.e2e,  # the worker and its host are processes on sockets
]


@dataclass
class FunctionApp:
    url: str
    backends: list[SimBackend]
    log: list[str]

    def azure(self, **kwargs: object) -> openai.AzureOpenAI:
        return openai.AzureOpenAI(
            azure_endpoint=self.url, api_key=KEY, api_version=API_VERSION, max_retries=0, timeout=30, **kwargs
        )

    def v1(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/openai/v1", api_key=KEY, max_retries=0, timeout=30)

    def reset(self) -> None:
        for backend in self.backends:
            backend.calls.clear()
            backend.answered.clear()
            backend.throttle_next = 0
            backend.chunk_gap = 0.0  # streams as fast as they can go, unless a test paces them


def deployment_files(root: Path = ROOT) -> list[Path]:
    """The files `azd deploy` / `func azure functionapp publish` put in the package: everything under
    `root` but what `.funcignore` (gitignore syntax) leaves out, relative to `root`."""
    spec = pathspec.GitIgnoreSpec.from_lines((root / ".funcignore").read_text().splitlines())
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not spec.match_file(f"{(here / d).as_posix()}/")]
        files += [here / n for n in names if not spec.match_file((here / n).as_posix())]
    return sorted(files)


def _lines(stream, into: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):
        into.put(line.rstrip("\n"))


@pytest.fixture(scope="module")
def function_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FunctionApp]:
    """The deployment package (this checkout minus `.funcignore`), served: what runs on Azure is what ships."""
    package = tmp_path_factory.mktemp("package")
    for name in deployment_files():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, package / name)
    servers = Servers()
    backends = [SimBackend(f"fn{i}", api_key=f"backend-key-{i}", chunks=6) for i in (1, 2)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "LB_", "AzureWebJobs", "WEBSITE_"))}
    env.update({"LB_CLIENT_KEYS": f"app:{KEY}", "LB_AFFINITY": "off"})
    for i, backend in enumerate(backends, start=1):
        env[f"BACKEND_{i}_URL"] = servers.start(backend)
        env[f"BACKEND_{i}_APIKEY"] = backend.api_key or ""
    port = free_port()
    process = subprocess.Popen(
        [str(FUNCHOST / "start"), str(port), str(package)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its worker is its child: one signal to the group stops both
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    log: list[str] = []
    deadline = time.monotonic() + START_SECONDS
    try:
        while not any(line.startswith("funchost: ready ") for line in log):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("funchost did not start:\n" + "\n".join(log[-40:]))
            try:
                log.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        app = FunctionApp(f"http://127.0.0.1:{port}", backends, log)
        deadline = time.monotonic() + 30  # the functions are listed right after the ready line
        while sum(line.startswith("funchost: function ") for line in log) < 5 and time.monotonic() < deadline:
            try:
                log.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        yield app
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        reader.join(5)  # the log's end: the process group has gone
        if not reader.is_alive():  # (closing it under a blocked read would wait for that read)
            process.stdout.close()
        servers.stop()


@pytest.fixture
def app(function_app: FunctionApp) -> FunctionApp:
    function_app.reset()
    return function_app


def test_the_worker_indexes_every_function_in_streaming_mode(app):
    ready = next(line for line in app.log if line.startswith("funchost: ready "))
    assert "mode=http-proxy" in ready  # the HTTP streaming extension put the worker in proxy mode
    routes = {line.rsplit(" ", 1)[1] for line in app.log if line.startswith("funchost: function ")}
    assert routes == {"/openai/{*path}", "/healthz", "/lb/status", "/lb/usage", "/{*path}"}
    assert httpx.get(app.url + "/healthz", timeout=10).json() == {"status": "ok"}


def test_chat_and_a_streamed_chat_whose_chunks_arrive_as_the_backend_sends_them(app):
    for backend in app.backends:
        backend.chunk_gap = 0.15
    client = app.azure()
    assert client.chat.completions.create(model="chat", messages=MESSAGES).choices[0].message.content
    started = time.monotonic()
    arrivals: list[float] = []
    text = ""
    for chunk in client.chat.completions.create(model="chat", messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text += chunk.choices[0].delta.content
    assert text and len(arrivals) == 6
    # six chunks 0.15 s apart: relayed as they come (buffered, they would all arrive at the end, ms apart)
    assert arrivals[-1] - arrivals[0] > 0.5, arrivals


def test_embeddings_and_the_v1_shape(app):
    assert len(app.azure().embeddings.create(model="embedding", input="x").data[0].embedding) > 0
    v1 = app.v1()
    assert v1.chat.completions.create(model="chat", messages=MESSAGES).choices
    assert v1.embeddings.create(model="embedding", input=["a", "b"]).data
    assert {c.path for b in app.backends for c in b.calls} >= {
        "/openai/deployments/embedding/embeddings",
        "/openai/v1/chat/completions",
        "/openai/v1/embeddings",
    }


def test_responses_created_and_streamed_on_both_paths(app):
    v1 = app.v1()
    assert v1.responses.create(model="chat", input="hi", store=False).status == "completed"
    with v1.responses.stream(model="chat", input="hi", store=False) as stream:
        types = [event.type for event in stream]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    azure = app.azure()
    assert azure.responses.create(model="chat", input="hi", store=False).status == "completed"
    with azure.responses.stream(model="chat", input="hi", store=False) as stream:
        assert stream.get_final_response().status == "completed"
    paths = [c.path for b in app.backends for c in b.calls]
    assert paths.count("/openai/v1/responses") == 2 and paths.count("/openai/responses") == 2


def test_a_throttled_backend_is_failed_over_within_the_call(app):
    throttled, other = app.backends
    throttled.throttle_next = 1
    other.throttle_next = 0
    served = []
    for _ in range(10):  # random choice: until the throttled one was tried first
        raw = app.azure().chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
        served.append((raw.status_code, raw.headers["x-lb-backend"], raw.headers["x-lb-attempts"]))
        if throttled.count(429):
            break
    assert throttled.count(429) == 1
    assert served[-1] == (200, "2", "2")  # answered by the other backend, in the same call
    assert "backend-key" not in str(served)


def test_no_key_is_401_and_an_unknown_path_is_the_json_404(app):
    answer = httpx.post(
        f"{app.url}/openai/deployments/chat/chat/completions?api-version={API_VERSION}",
        json={"messages": MESSAGES},
        timeout=10,
    )
    assert answer.status_code == 401 and set(answer.json()["error"]) == {"code", "message"}
    missing = httpx.post(f"{app.url}/chat/completions", json={"model": "chat"}, timeout=10)
    assert missing.status_code == 404 and "/openai/v1" in missing.json()["error"]["message"]
    assert not any(b.calls for b in app.backends)
