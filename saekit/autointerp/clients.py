"""Language models that explain and score: any OpenAI-compatible chat endpoint, a local
Hugging Face causal LM, or any Python callable.

A client has a `name` (recorded with each explanation), a `concurrency` (how many calls it
takes at once) and `complete(messages, max_tokens=..., temperature=...) -> str`.

The endpoint client speaks the chat-completions protocol through the `openai` package (the
`saekit[autointerp]` extra), which vLLM, Ollama, llama.cpp's server and hosted APIs all
accept. It retries 408, 409, 429, 5xx answers, timeouts and dropped connections with
exponential backoff (`retry_delay` doubling each try, or the server's Retry-After when
longer), and turns everything else into an `EndpointError` whose message says what to do.
The key is read from an environment variable, kept out of every message, log and file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from saekit.errors import SaekitError

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
#: Client kinds a `KIND:NAME` spec may name.
CLIENT_KINDS = ("openai", "hf")
#: HTTP statuses worth another try: request timeout, conflict, rate limit (and any 5xx).
RETRY_STATUSES = (408, 409, 429)
#: Longest wait between tries, whatever the backoff or the server's Retry-After say.
MAX_RETRY_DELAY_S = 60.0


class EndpointError(SaekitError):
    """The endpoint could not be used: unreachable, refusing the key, or failing."""


class ChatClient(Protocol):
    name: str
    concurrency: int

    def complete(self, messages: Messages, *, max_tokens: int, temperature: float) -> str: ...


class CallableClient:
    """Any Python function `fn(messages) -> str` as a client (`concurrency` calls at once)."""

    def __init__(
        self, fn: Callable[[Messages], str], name: str = "python", concurrency: int = 1
    ) -> None:
        self.fn, self.name, self.concurrency = fn, name, concurrency

    def complete(self, messages: Messages, *, max_tokens: int, temperature: float) -> str:
        return str(self.fn(messages))

    def __repr__(self) -> str:
        return f"CallableClient({self.name!r})"


def parse_client_spec(spec: str, flag: str = "--explainer") -> tuple[str, str]:
    """`openai:MODEL` or `hf:NAME_OR_PATH` -> (kind, name); the name may hold colons
    (`openai:llama3.1:8b`). Refuses anything else with the forms it takes."""
    kind, sep, name = spec.partition(":")
    if not sep or kind not in CLIENT_KINDS or not name.strip():
        raise ValueError(
            f"{flag} {spec!r}: say which kind of model, as openai:MODEL (an OpenAI-compatible "
            "endpoint: --base-url, key in $OPENAI_API_KEY) or hf:NAME_OR_PATH (a local "
            "Hugging Face model; hf:bundled is saekit's demo model); known kinds: "
            + ", ".join(CLIENT_KINDS)
        )
    return kind, name.strip()


def _import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise ImportError(
            "the endpoint client needs the openai package: pip install 'saekit[autointerp]' "
            "(or pip install openai)"
        ) from None
    return openai


class OpenAIClient:
    """A model behind an OpenAI-compatible chat-completions endpoint.

    Args:
        model: the model name the server knows (`gpt-4o-mini`, `Qwen/Qwen2.5-7B-Instruct`,
            `llama3.1:8b`).
        base_url: the endpoint's base URL, up to and including `/v1`.
        api_key_env: the environment variable holding the key; unset means no key (local
            servers need none).
        timeout: seconds to wait for one answer.
        max_retries: further tries after a retryable failure.
        retry_delay: seconds before the first retry; doubled for each further one.
        concurrency: calls sent at once.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str = DEFAULT_KEY_ENV,
        timeout: float = 60.0,
        max_retries: int = 5,
        retry_delay: float = 1.0,
        concurrency: int = 4,
    ) -> None:
        if timeout <= 0 or max_retries < 0 or retry_delay < 0 or concurrency < 1:
            raise ValueError(
                f"timeout must be > 0, max_retries and retry_delay >= 0 and concurrency >= 1; "
                f"got {timeout}, {max_retries}, {retry_delay}, {concurrency}"
            )
        self.openai = _import_openai()
        self.name = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.retry_delay = timeout, max_retries, retry_delay
        self.concurrency = concurrency
        self._key = os.environ.get(api_key_env) or ""
        # Retries are ours (so the base delay is a setting and failures read as ours).
        self._client = self.openai.OpenAI(
            base_url=self.base_url, api_key=self._key or "no-key", timeout=timeout,
            max_retries=0,
        )

    def __repr__(self) -> str:
        return f"OpenAIClient({self.name!r}, base_url={self.base_url!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _where(self) -> str:
        return f"{self.base_url} (model {self.name})"

    def _refused(self, err: Any) -> EndpointError:
        status = getattr(err, "status_code", "?")
        held = f"the key in ${self.api_key_env}" if self._key else (
            f"no key (${self.api_key_env} is not set)"
        )
        return EndpointError(
            f"{self._where()} refused {held} (HTTP {status}: {self._scrub(_brief(err))}); "
            f"set ${self.api_key_env} to a valid key, or name another variable with "
            "--api-key-env"
        )

    def _fatal(self, err: Any) -> EndpointError:
        """An error no retry mends, as one line saying what to do."""
        o = self.openai
        if isinstance(err, (o.AuthenticationError, o.PermissionDeniedError)):
            return self._refused(err)
        if isinstance(err, o.NotFoundError):
            return EndpointError(
                f"{self._where()} answered 404 ({self._scrub(_brief(err))}): check the model "
                "name and that --base-url ends where the server's /v1 is"
            )
        status = getattr(err, "status_code", None)
        return EndpointError(
            f"{self._where()} answered HTTP {status} ({self._scrub(_brief(err))})"
        )

    def _retryable(self, err: Exception) -> bool:
        o = self.openai
        if isinstance(err, (o.APITimeoutError, o.APIConnectionError)):
            return True
        status = getattr(err, "status_code", None)
        return isinstance(status, int) and (status in RETRY_STATUSES or status >= 500)

    def _failed(self, err: Exception, tries: int) -> EndpointError:
        o = self.openai
        if isinstance(err, o.APITimeoutError):
            what = f"did not answer within {self.timeout:g} s"
            fix = "raise --timeout, or lower --concurrency if the server is overloaded"
        elif isinstance(err, o.APIConnectionError):
            what = "cannot be reached"
            fix = "check that the server is running and --base-url is right"
        else:
            what = f"answered HTTP {getattr(err, 'status_code', '?')} ({_brief(err)})"
            fix = "try again later, or lower --concurrency"
        return EndpointError(
            self._scrub(f"{self._where()} {what} ({tries} tries); {fix}. Answers already "
                        "received are kept: run the same command again to go on")
        )

    def _delay(self, err: Exception, attempt: int) -> float:
        delay = self.retry_delay * 2**attempt
        response = getattr(err, "response", None)
        after = getattr(response, "headers", {}).get("retry-after") if response else None
        try:
            delay = max(delay, float(after)) if after is not None else delay
        except ValueError:
            pass
        return min(delay, MAX_RETRY_DELAY_S)

    def complete(self, messages: Messages, *, max_tokens: int, temperature: float) -> str:
        """The model's answer to `messages`, retried as the module docstring says."""
        o = self.openai
        for attempt in range(self.max_retries + 1):
            try:
                response = self._client.chat.completions.create(
                    model=self.name, messages=messages, max_tokens=max_tokens,
                    temperature=temperature,
                )
            except o.APIError as err:
                if not self._retryable(err):
                    raise self._fatal(err) from None
                if attempt == self.max_retries:
                    raise self._failed(err, attempt + 1) from None
                delay = self._delay(err, attempt)
                logger.info("%s: %s; retrying in %.2g s", self.name,
                            self._scrub(_brief(err)), delay)
                time.sleep(delay)
                continue
            if not response.choices:
                raise EndpointError(f"{self._where()} answered with no choices")
            return response.choices[0].message.content or ""
        raise AssertionError("unreachable")

    def check(self) -> None:
        """Raise an `EndpointError` now if the endpoint cannot be reached or refuses the key;
        warn if it lists its models and this one is not among them. Sends no prompt."""
        o = self.openai
        try:
            names = [m.id for m in self._client.models.list().data]
        except (o.AuthenticationError, o.PermissionDeniedError) as err:
            raise self._refused(err) from None
        except (o.APITimeoutError, o.APIConnectionError) as err:
            raise self._failed(err, 1) from None
        except o.APIStatusError:
            return  # reachable and not refusing; it just lists no models
        if names and self.name not in names:
            shown = ", ".join(sorted(names)[:10]) + (" ..." if len(names) > 10 else "")
            logger.warning("%s does not list the model %r; it lists: %s",
                           self.base_url, self.name, shown)


def _brief(err: Any) -> str:
    """An openai error's message, on one line and short."""
    text = " ".join(str(getattr(err, "message", None) or err).split())
    return text if len(text) <= 200 else text[:200] + " ..."


class TransformersClient:
    """A local Hugging Face causal LM (`AutoModelForCausalLM`, no remote code), answering
    greedily (or sampling when temperature > 0). One call at a time.

    Messages go through the tokenizer's chat template when it has one, else they are written
    as `System:` / `User:` / `Assistant:` turns. A prompt longer than the model's context
    keeps its end (a warning says so). `model` is a name or folder, `bundled` (saekit's demo
    model), or a loaded model (then pass `tokenizer`).
    """

    concurrency = 1

    def __init__(
        self, model: str | Path | Any, tokenizer: Any = None, *, device: str = "cpu"
    ) -> None:
        if isinstance(model, (str, Path)):
            self.name = f"hf:{model}"
            if str(model) == "bundled":
                from saekit.models.bundled import load_bundled_hf, load_bundled_tokenizer

                model, tokenizer = load_bundled_hf(device), load_bundled_tokenizer()
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
                model = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=False)
                model.to(device)
        else:
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer: pass tokenizer=...")
            self.name = "hf:" + str(getattr(model.config, "_name_or_path", "") or "model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._lock = threading.Lock()
        self._warned = False
        cfg = model.config
        self.context = getattr(cfg, "n_positions", None) or getattr(
            cfg, "max_position_embeddings", None
        )

    def __repr__(self) -> str:
        return f"TransformersClient({self.name!r})"

    def prompt_text(self, messages: Messages) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, verbose=False)["input_ids"])

    def complete(self, messages: Messages, *, max_tokens: int, temperature: float) -> str:
        import torch

        # verbose=False: a prompt longer than the model's context is expected (cut below).
        ids = self.tokenizer(
            self.prompt_text(messages), return_tensors="pt", verbose=False
        )["input_ids"]
        if self.context is not None and ids.shape[1] + max_tokens > self.context:
            keep = max(1, self.context - max_tokens)
            if not self._warned:
                logger.warning(
                    "%s: prompts of %d tokens do not fit its context of %d with %d to "
                    "generate; only their last %d tokens are given", self.name, ids.shape[1],
                    self.context, max_tokens, keep,
                )
                self._warned = True
            ids = ids[:, -keep:]
        device = next(self.model.parameters()).device
        ids = ids.to(device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
            "do_sample": False
        }
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                pad_token_id=pad, **sampling,
            )
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def make_client(
    spec: str | ChatClient | Callable[[Messages], str],
    *,
    flag: str = "--explainer",
    base_url: str = DEFAULT_BASE_URL,
    api_key_env: str = DEFAULT_KEY_ENV,
    timeout: float = 60.0,
    max_retries: int = 5,
    retry_delay: float = 1.0,
    concurrency: int = 4,
    device: str = "cpu",
) -> ChatClient:
    """A client from a spec (`openai:MODEL`, `hf:NAME_OR_PATH`), a client, or a callable."""
    if not isinstance(spec, str):
        if hasattr(spec, "complete") and hasattr(spec, "name"):
            return spec  # type: ignore[return-value]
        if callable(spec):
            return CallableClient(spec, name=getattr(spec, "__name__", "python"))
        raise TypeError(f"{flag}: expected a spec string, a client or a callable, got {spec!r}")
    kind, name = parse_client_spec(spec, flag)
    if kind == "hf":
        return TransformersClient(name, device=device)
    return OpenAIClient(
        name, base_url=base_url, api_key_env=api_key_env, timeout=timeout,
        max_retries=max_retries, retry_delay=retry_delay, concurrency=concurrency,
    )

