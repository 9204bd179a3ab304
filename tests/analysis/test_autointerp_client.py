"""The endpoint client against a small chat-completions server run by the test: answers,
retries with backoff, errors, the key kept secret, and resuming a killed run."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai")

from test_autointerp_world import decode, world_negatives, world_stats  # noqa: E402

from saekit.analysis.explanations import read_explanations  # noqa: E402
from saekit.autointerp import (  # noqa: E402
    AutointerpConfig,
    EndpointError,
    OpenAIClient,
    explain_latents,
)
from saekit.cli import main  # noqa: E402

KEY = "sk-test-Zq9-SECRET-4471"
HELLO = [{"role": "user", "content": "hello"}]


def echo_answer(body: dict) -> str:
    """A deterministic answer: an explanation, or one label per numbered excerpt."""
    user = body["messages"][-1]["content"]
    if user.startswith("Description:"):
        n = len(re.findall(r"^\d+\. ", user, flags=re.MULTILINE))
        return "[" + ", ".join("1" if i % 2 == 0 else "0" for i in range(n)) + "]"
    return f"Explanation: pattern {len(user) % 97}"


class Server:
    """POST /v1/chat/completions and GET /v1/models, enough of the protocol for openai.

    `script` holds what to do for the next requests, one entry each (then: answer):
    ("status", code) answers that error (with `headers`), ("sleep", s) waits s seconds
    before answering, ("hold", None) blocks until `release` is set."""

    def __init__(self) -> None:
        self.script: list[tuple[str, object]] = []
        self.headers: dict[str, str] = {}
        self.requests: list[dict] = []
        self.answered: list[dict] = []
        self.auth: list[str] = []
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, payload: dict, extra: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                server.auth.append(self.headers.get("Authorization", ""))
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [
                        {"id": "m", "object": "model", "created": 0, "owned_by": "t"}]})
                else:
                    self._send(404, {"error": {"message": "no such path"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.append(self.headers.get("Authorization", ""))
                with server.lock:
                    server.requests.append(body)
                    action = server.script.pop(0) if server.script else ("ok", None)
                kind, value = action
                if kind == "status":
                    message = f"error {value}"
                    if value == 401:  # as some servers do: quote the key back
                        message = f"Incorrect API key provided: {self.headers['Authorization']}"
                    self._send(int(value), {"error": {"message": message}}, server.headers)
                    return
                if kind == "sleep":
                    time.sleep(float(value))
                if kind == "hold":
                    server.held.set()
                    server.release.wait(30)
                    return
                content = echo_answer(body)
                try:
                    self._send(200, {
                        "id": "c", "object": "chat.completion", "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                    })
                except (BrokenPipeError, ConnectionResetError):
                    return
                with server.lock:
                    server.answered.append(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("SAEKIT_TEST_KEY", KEY)
    return "SAEKIT_TEST_KEY"


def client(server: Server, key: str, **kw: object) -> OpenAIClient:
    settings = {"timeout": 5.0, "max_retries": 3, "retry_delay": 0.05, **kw}
    return OpenAIClient("m", base_url=server.url, api_key_env=key, **settings)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_answer_and_request(server, key):
    answer = client(server, key).complete(HELLO, max_tokens=7, temperature=0.0)
    assert answer == echo_answer(server.requests[0])
    sent = server.requests[0]
    assert sent["model"] == "m" and sent["messages"] == HELLO and sent["max_tokens"] == 7
    assert server.auth == [f"Bearer {KEY}"]


def test_429_then_200_retries_after_backoff(server, key):
    server.script = [("status", 429)]
    start = time.perf_counter()
    answer = client(server, key, retry_delay=0.2).complete(HELLO, max_tokens=5, temperature=0)
    assert time.perf_counter() - start >= 0.2
    assert answer == echo_answer(server.requests[-1]) and len(server.requests) == 2


def test_retry_after_header_is_honoured(server, key):
    server.script = [("status", 429)]
    server.headers = {"Retry-After": "0.4"}
    start = time.perf_counter()
    client(server, key, retry_delay=0.01).complete(HELLO, max_tokens=5, temperature=0)
    assert time.perf_counter() - start >= 0.4


def test_500_every_time_fails_after_the_retries_with_doubling_delays(server, key):
    server.script = [("status", 500)] * 10
    start = time.perf_counter()
    with pytest.raises(EndpointError, match=r"answered HTTP 500 .*3 tries.*run the same command"):
        client(server, key, max_retries=2, retry_delay=0.1).complete(
            HELLO, max_tokens=5, temperature=0
        )
    assert len(server.requests) == 3
    assert time.perf_counter() - start >= 0.1 + 0.2  # waited 0.1 then 0.2


def test_500_then_200(server, key):
    server.script = [("status", 500), ("status", 503)]
    answer = client(server, key).complete(HELLO, max_tokens=5, temperature=0)
    assert len(server.requests) == 3 and answer.startswith("Explanation")


def test_timeout_is_retried_then_reported(server, key):
    server.script = [("sleep", 1.0)] * 3
    start = time.perf_counter()
    with pytest.raises(EndpointError, match=r"did not answer within 0.2 s \(2 tries\)"):
        client(server, key, timeout=0.2, max_retries=1).complete(
            HELLO, max_tokens=5, temperature=0
        )
    assert len(server.requests) == 2
    assert time.perf_counter() - start < 1.5


def test_refused_key_is_one_clear_line_without_the_key(server, key, caplog):
    caplog.set_level(logging.DEBUG)
    client(server, key).complete(HELLO, max_tokens=5, temperature=0)  # logged at DEBUG
    server.script = [("status", 401)]
    with pytest.raises(EndpointError) as err:
        client(server, key).complete(HELLO, max_tokens=5, temperature=0)
    message = str(err.value)
    assert "refused the key in $SAEKIT_TEST_KEY" in message and "HTTP 401" in message
    assert KEY not in message and KEY not in caplog.text
    assert len(server.requests) == 2  # a refused key is not retried


def test_unreachable_endpoint(key):
    with pytest.raises(EndpointError, match="cannot be reached"):
        OpenAIClient("m", base_url=closed_port_url(), api_key_env=key).check()


def test_check_warns_of_an_unlisted_model(server, key, caplog):
    client(server, key).check()
    assert not caplog.records
    OpenAIClient("other", base_url=server.url, api_key_env=key).check()
    assert "does not list the model 'other'" in caplog.text and "lists: m" in caplog.text


def test_cli_unreachable_endpoint_is_one_line_before_any_model_work(tmp_path, capsys, key):
    # The SAE folder does not exist: the endpoint is checked before anything is loaded.
    code = main(["autointerp", str(tmp_path / "no-sae"), "--out", str(tmp_path / "o"),
                 "--explainer", "openai:m", "--base-url", closed_port_url(),
                 "--api-key-env", key, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("saekit: error: ") and "cannot be reached" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--explainer", "gpt-4o"], "say which kind of model"),
    (["--explainer", "vllm:m"], "known kinds: openai, hf"),
    (["--explainer", "openai:m", "--scorer", "x:y"], "--scorer 'x:y'"),
    (["--explainer", "openai:m", "--latents", "5-1"], "runs backwards"),
    (["--explainer", "openai:m", "--latents", "random:x"], "is not a latent id or range"),
    (["--explainer", "openai:m", "--fuzz-mode", "odd"], "fuzz_mode must be one of"),
])
def test_cli_bad_inputs(tmp_path, capsys, args, expected):
    code = main(["autointerp", str(tmp_path / "no-sae"), "--out", str(tmp_path / "o"),
                 "--base-url", closed_port_url(), *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1


# ----- the whole run against the server: the key stays secret; a killed run resumes ----------

RUN = """
import sys
from saekit.autointerp import AutointerpConfig, OpenAIClient, explain_latents
from test_autointerp_world import decode, world_negatives, world_stats
client = OpenAIClient("m", base_url=sys.argv[1], api_key_env="SAEKIT_TEST_KEY",
                      retry_delay=0.01, concurrency=1)
explain_latents(world_stats(), world_negatives(), decode, sys.argv[2], explainer=client,
                latents=[0, 1, 2], config=AutointerpConfig(n_test=6, n_negatives=6),
                progress=False)
"""


def run_script(server: Server, out: Path) -> subprocess.Popen:
    env = {**os.environ, "SAEKIT_TEST_KEY": KEY,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", RUN, server.url, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_run_against_the_server_keeps_the_key_secret(server, key, tmp_path, capsys,
                                                         caplog):
    from analysis_helpers import make_sae

    from saekit.models.tiny import tiny_gpt2, tiny_tokenizer

    tiny_gpt2(300).save_pretrained(tmp_path / "model")
    tiny_tokenizer(300).save_pretrained(tmp_path / "model")
    sae = make_sae("blocks.0.hook_resid_pre", d_sae=8)
    sae.cfg.metadata.model_name = str(tmp_path / "model")
    sae.cfg.metadata.context_size = 64
    sae.save(tmp_path / "sae")
    caplog.set_level(logging.DEBUG)
    code = main(["-v", "autointerp", str(tmp_path / "sae"), "--out", str(tmp_path / "run"),
                 "--explainer", "openai:m", "--base-url", server.url, "--api-key-env", key,
                 "--latents", "all", "--tokens", "2048", "--negative-windows", "32",
                 "--min-examples", "4", "--n-test", "4", "--n-negatives", "4",
                 "--retry-delay", "0.01", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    done = read_explanations(tmp_path / "run")
    assert done and all(e.explainer_model == "m" for e in done.values())
    assert str((tmp_path / "run" / "explanations.jsonl").resolve()) in printed.out
    assert all(a == f"Bearer {KEY}" for a in server.auth) and len(server.auth) > 1
    assert KEY not in printed.out + printed.err + caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_run_resumes_without_asking_again(server, tmp_path):
    out = tmp_path / "run"
    # 3 latents x (1 explainer + 3 detection + 3 fuzzing calls) = 21 calls; hold the 12th.
    server.script = [("ok", None)] * 11 + [("hold", None)]
    first = run_script(server, out)
    assert server.held.wait(60), first.communicate()
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    answered_before = [json.dumps(b, sort_keys=True) for b in server.answered]
    assert len(answered_before) == 11
    server.release.set()
    n_before = len(server.requests)

    second = run_script(server, out)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    asked_after = [json.dumps(b, sort_keys=True) for b in server.requests[n_before:]]
    assert not set(asked_after) & set(answered_before)
    assert len(asked_after) == 21 - 11
    done = read_explanations(out)
    assert sorted(done) == [0, 1, 2]
    assert all(set(e.scores) == {"detection", "fuzzing"} for e in done.values())

    # Nothing written and nothing said carries the key.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in stdout + stderr

    # Run again (here, in-process): nothing left to do, nothing sent.
    n_now = len(server.requests)
    os.environ["SAEKIT_TEST_KEY"] = KEY
    try:
        again = explain_latents(
            world_stats(), world_negatives(), decode, out, latents=[0, 1, 2],
            explainer=OpenAIClient("m", base_url=server.url, api_key_env="SAEKIT_TEST_KEY"),
            config=AutointerpConfig(n_test=6, n_negatives=6), progress=False,
        )
    finally:
        del os.environ["SAEKIT_TEST_KEY"]
    assert len(server.requests) == n_now and again.plan.done == [0, 1, 2] and again.sent == 0
    assert again.explanations == done
