"""The ``ragserve`` command line's shared parts: the Typer app, the consoles, the config
option and the error handling every command uses (``cli/main.py`` and ``cli/serving.py`` add
the commands).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ragserve.errors import RagserveError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ragserve: a multi-tier RAG serving engine.")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML config file.")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    "--ray-address", help="With --ray: HOST:PORT of a cluster's head (or ray://HOST:PORT), 'auto' (any running "
                          "cluster, else fail) or 'local' (a new one for this run). Default: ray.address, else "
                          "RAY_ADDRESS, else the cluster `ray start` runs on this machine, else a local one "
                          "started for this run and stopped after it.")]
"""``--ray-address`` of every command that runs on Ray (``cluster.cluster_target``)."""
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Which of the config's \\[models] answers (default: models.default, or the router's "
                          "pick with models.route = \"auto\"; \"auto\" asks for the pick). An unknown one is "
                          "refused before the engine starts.")]
"""``--model`` of every command that answers questions (``RAG.query(model=...)``)."""


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A ``RagserveError`` becomes one line naming its stage, and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RagserveError as e:
            # escape: the message starts with its stage in brackets ("[index] ..."), which rich
            # would otherwise take for a markup tag and drop
            console.print(f"[bold red]error[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def load_config(path: Path | None, **sections: dict[str, Any]) -> Any:
    """The config file (and ``RAGSERVE_*`` env), with the options given on the command line."""
    from ragserve.config import RAGConfig

    cfg = RAGConfig.load(path)
    sections = {k: {f: v for f, v in s.items() if v is not None} for k, s in sections.items()}
    return cfg.replace(**{k: v for k, v in sections.items() if v})
