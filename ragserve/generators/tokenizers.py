"""Where a remote generator's tokenizer comes from (``openai.tokenizer``).

The prompt builder needs the model's own tokenizer to fit its token budget
(``apply_chat_template``, ``encode``, ``decode``). A remote model leaves two sources:

- ``""``: the local model folder ``generate.model`` names, loaded with transformers'
  ``AutoTokenizer`` (only the tokenizer files are read, not the weights). Its token ids go
  to the server as the prompt, so the server tokenizes nothing again.
- ``"server"``: ``ServerTokenizer``, which asks the servers' ``POST /tokenize`` (with
  ``messages``, the server applies the model's chat template) and ``POST /detokenize``, as
  vLLM's OpenAI server offers them. It costs round trips per prompt (a prompt that must
  drop sources costs a few more), so it is marked ``remote``: the pipeline builds such
  prompts off its event loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from ragserve.errors import GenerationError, GeneratorUnavailableError, ModelError
from ragserve.generators.endpoints import Endpoint, shown_url


def local_tokenizer(model: str) -> Any:
    """The tokenizer of the local model folder ``model`` names ("default" included)."""
    from ragserve.models.resolve import resolve_generation_model

    path = resolve_generation_model(model)
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ModelError(f"the tokenizer of {path} needs transformers ({e}): `pip install transformers`, "
                         "or set openai.tokenizer = \"server\" to ask the servers") from e
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {path}: {e}", stage="generate") from e


class ServerTokenizer:
    """A tokenizer that asks the generation servers (``openai.tokenizer = "server"``).

    **Usage:** built by ``OpenAIGenerator.tokenizer()``; ``PromptBuilder(tok, 2048, 64)``.
    Blocking calls, safe from several threads at once.
    """

    remote = True
    """Each call waits on the network: callers keep it off an event loop."""

    def __init__(self, endpoints: Callable[[], Sequence[Endpoint]], model: Callable[[], str],
                 headers: dict[str, str], timeout: httpx.Timeout) -> None:
        self._endpoints = endpoints
        self._model = model
        self._client = httpx.Client(headers=headers, timeout=timeout)
        # NOTE: the builder encodes the text it just rendered; the ids the server gave for
        # the messages are those exact tokens, so the render remembers them.
        self._rendered: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True, **_: Any) -> Any:
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        ids = self._post("/tokenize", body)["tokens"]
        if tokenize:
            return ids
        text = self.decode(ids)
        with self._lock:
            self._rendered[text] = ids
            while len(self._rendered) > 64:
                self._rendered.popitem(last=False)
        return text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not add_special_tokens:
            with self._lock:
                ids = self._rendered.get(text)
            if ids is not None:
                return list(ids)
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})["tokens"]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._post("/detokenize", {"tokens": list(ids)})["prompt"])

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The first healthy endpoint that answers; a 4xx is the request's fault (no other
        endpoint is tried), a network error or a 5xx moves on to the next endpoint."""
        model = self._model()
        if model:
            body = {"model": model, **body}
        problems = []
        for ep in sorted(self._endpoints(), key=lambda e: e.ejected):
            try:
                r = self._client.post(ep.url + path, json=body)
            except httpx.HTTPError as e:
                problems.append(f"{shown_url(ep.url)}: {type(e).__name__}: {e}")
                continue
            if r.status_code >= 500:
                problems.append(f"{shown_url(ep.url)}: HTTP {r.status_code}")
                continue
            if r.status_code != 200:
                raise GenerationError(
                    f"{shown_url(ep.url)}{path} refused the request: HTTP {r.status_code} {r.text[:300]} "
                    "(openai.tokenizer = \"server\" needs vLLM's /tokenize and /detokenize; \"\" reads the "
                    "local folder of generate.model)")
            return dict(r.json())
        raise GeneratorUnavailableError(
            f"no generator endpoint could tokenize: {'; '.join(problems) or 'none'}")

    def close(self) -> None:
        self._client.close()
