"""Every answer a model gave, on disk, so that an interrupted run never pays for it again.

`autointerp_answers.jsonl` holds one line per answered call: a key (SHA-256 of the model
name, the messages and the generation settings) and the answer. Prompts are deterministic
(seeded), so a resumed run asks the same questions and finds their answers here. Lines are
appended and flushed as answers arrive; a torn last line (a killed run) is ignored. No key or
secret is part of what is hashed or written.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from saekit.autointerp.clients import ChatClient, Messages

ANSWERS_FILE = "autointerp_answers.jsonl"


def call_key(model: str, messages: Messages, max_tokens: int, temperature: float) -> str:
    payload = json.dumps(
        {"model": model, "messages": messages, "max_tokens": max_tokens,
         "temperature": temperature},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """The answers file of a run folder; `ask` answers from it or asks the client."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / ANSWERS_FILE
        self.answers: dict[str, str] = {}
        self.sent = 0
        self._lock = threading.Lock()
        if self.path.is_file():
            drop_torn_tail(self.path)
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    record = json.loads(line)
                    self.answers[str(record["key"])] = str(record["answer"])
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{self.path}:{number} is not a cached answer ({err}); delete that "
                        "line (its call will be made again)"
                    ) from err

    def __contains__(self, key: str) -> bool:
        return key in self.answers

    def ask(
        self, client: ChatClient, messages: Messages, *, max_tokens: int, temperature: float
    ) -> str:
        key = call_key(client.name, messages, max_tokens, temperature)
        with self._lock:
            if key in self.answers:
                return self.answers[key]
        answer = client.complete(messages, max_tokens=max_tokens, temperature=temperature)
        with self._lock:
            self.answers[key] = answer
            self.sent += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                line = json.dumps({"key": key, "answer": answer}, ensure_ascii=False)
                handle.write(line + "\n")
                handle.flush()
        return answer


def drop_torn_tail(path: Path) -> bool:
    """Cut a last line left unfinished by a killed run (no newline at the end of the file),
    so that the next appended line starts on a line of its own. True if one was cut."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with path.open("r+b") as handle:
        handle.truncate(data.rfind(b"\n") + 1)
    return True
