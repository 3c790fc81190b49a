"""``ragserve serve``, ``batch`` and ``warm``: the commands that answer questions with the
engine (registered on ``cli_app.app``; ``cli/main.py`` imports this module)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from ragserve.cli.app import ConfigOpt, ModelOpt, RayAddressOpt, app, console, fails_cleanly, load_config, out
from ragserve.cli.console import question_progress
from ragserve.cli.quiet import data_stdout


@app.command("batch")
@fails_cleanly
def batch_cmd(
    index: Annotated[Path, typer.Argument(help="An index folder.")],
    questions: Annotated[Path, typer.Argument(help="JSONL: {\"id\": ..., \"question\": ..., \"model\": ...} (id "
                                                   "and model optional) or a string per line.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="JSONL answers file; appended to, and resumed from.")],
    concurrency: Annotated[int, typer.Option(help="Questions in the engine at once.")] = 16,
    timeout: Annotated[Optional[float], typer.Option(help="Deadline per question, seconds.")] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Answer on a Ray cluster: a pool of Ray Data actors over a generator deployment "
                      "(vllm; with \\[models], one per group of models sharing an engine) or the openai "
                      "backend's servers; same output and resume. --concurrency is "
                      "the total over all actors. On several machines, INDEX must be at the same path on "
                      "every node.")] = False,
    ray_address: RayAddressOpt = None,
    ray_actors: Annotated[Optional[int], typer.Option(
        "--ray-actors", min=1, help="With --ray: answering actors, a CPU each (default: one per CPU left "
                                    "free on the cluster).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Answer a file of questions: bounded concurrency, progress, resume after an interruption.
    A line's own "model" wins over --model.

    Exits 0 when every question has an answer, 2 when some failed (their lines say why).
    """
    import asyncio
    import contextlib

    from ragserve.jobs.batch import check_questions, read_lines, run_batch

    cfg = load_config(config)
    if (ray_address or ray_actors) and not ray:
        raise typer.BadParameter("--ray-address and --ray-actors need --ray")
    # a bad questions file, a question that cannot be asked or a model not served fails
    # before the engine starts
    lines = read_lines(questions)
    check_questions([(qid, q) for qid, q, _ in lines], cfg.query.max_question_chars, questions)
    for name in sorted({model, *(m for _, _, m in lines)} - {None}):
        cfg.models.check(name)
    with contextlib.ExitStack() as stack:
        if not ray:
            from ragserve.rag import RAG

            rag = stack.enter_context(RAG.from_index(index, cfg))
        update = stack.enter_context(question_progress(console, "answering"))

        def on_start(s: Any) -> None:
            update(total=s.total - s.skipped)
            if s.skipped:
                console.print(f"resuming: {s.skipped} of {s.total} questions already answered in {out_file}")

        def on_record(record: dict[str, Any], s: Any) -> None:
            update(completed=s.done + s.failed, rate=f"{s.per_second:.2f} q/s",
                   note=f"[red]{s.failed} failed[/]" if s.failed else "")

        try:
            if ray:
                from ragserve.ray.batch import run_batch_ray

                summary = run_batch_ray(index, questions, out_file, cfg, address=ray_address,
                                        actors=ray_actors, concurrency=concurrency, timeout_s=timeout,
                                        model=model, on_start=on_start, on_record=on_record,
                                        say=lambda line: console.print(line, highlight=False))
            else:
                summary = asyncio.run(run_batch(rag, questions, out_file, concurrency=concurrency,
                                                timeout_s=timeout, model=model, on_start=on_start,
                                                on_record=on_record))
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: the answers written so far are kept in {out_file}; "
                          "run the same command again to resume")
            raise typer.Exit(130) from None
    s = summary.as_dict()
    out.print(f"done {s['done']}, failed {s['failed']}, skipped {s['skipped']} (already answered) of {s['total']}; "
              f"{s['seconds']} s, {s['questions_per_s']} questions/s → {out_file}")
    if summary.failed:
        raise typer.Exit(2)


@app.command("warm")
@fails_cleanly
def warm_cmd(
    index: Annotated[Path, typer.Argument(help="The index folder the service serves.")],
    questions: Annotated[Path, typer.Argument(help="A question log, as for batch; repeats welcome.")],
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the N most frequent questions.")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="A tenant's namespace (cache.namespace).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Questions in the engine at once.")] = 16,
    timeout: Annotated[Optional[float], typer.Option(help="Deadline per question, seconds.")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="As for serve (cache.redis_url).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the summary as one JSON line, alone on stdout (the rest on stderr).")] = False,
    answers: Annotated[Optional[Path], typer.Option(help="Also write each question's stored answer here (JSONL: "
                                                    "question, answer, cache_tier).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Precompute answers into the L2 cache that `ragserve serve` with the same config reads,
    from a question log: most frequent first, progress, resume (answers already in L2 cost
    nothing). Exits 0 when every question is warm, 2 when some failed. Each of \\[models] has
    its own answers: --model warms one (default: what a request naming no model gets)."""
    import contextlib

    import orjson

    from ragserve.jobs.warm import warm

    cfg = load_config(config, cache={"redis_url": redis_url})
    last: list[Any] = []
    # --json: the JSON line alone on stdout; the summary, progress and engine lines on stderr
    with data_stdout(json_out) as data:
        try:
            with question_progress(console, "warming") as update:

                def on_start(s: Any) -> None:
                    last.append(s)
                    update(total=s.total)
                    console.print(f"{s.lines} questions, {s.distinct} distinct; warming {s.total} into {s.l2} "
                                  f"(namespace {s.namespace!r})", highlight=False)

                def on_done(s: Any) -> None:
                    failed = f", [red]{s.failed} failed[/]" if s.failed else ""
                    update(completed=s.done, rate=f"{s.per_second:.2f} q/s",
                           note=f"{s.already_warm} already warm{failed}")

                with contextlib.ExitStack() as stack:
                    sink = stack.enter_context(open(answers, "ab")) if answers else None

                    def on_answer(item: Any, r: Any) -> None:
                        assert sink is not None
                        sink.write(orjson.dumps({"question": item.question, "answer": r.answer,
                                                 "cache_tier": r.cache_tier}) + b"\n")

                    s = warm(index, questions, cfg, namespace=namespace, limit=limit, concurrency=concurrency,
                             timeout_s=timeout, model=model, on_start=on_start, on_done=on_done,
                             on_answer=on_answer if sink else None)
        except KeyboardInterrupt:
            done = f" ({last[0].warmed} warmed now)" if last else ""
            console.print(f"[yellow]interrupted[/]: the answers stored so far stay in L2{done}; "
                          "run the same command again to resume")
            raise typer.Exit(130) from None
        of = f" of {s.distinct}" if s.total < s.distinct else ""  # --limit
        out.print(f"{s.total}{of} distinct questions: warmed {s.warmed}, already warm {s.already_warm}, "
                  f"failed {s.failed}; {s.seconds:.1f} s, {s.per_second:.2f} questions/s", highlight=False)
        for question, error in s.failures[:10]:
            console.print(f"  [red]failed[/] {escape(repr(question[:80]))}: {escape(error)}", highlight=False)
        if len(s.failures) > 10:
            console.print(f"  and {len(s.failures) - 10} more failed")
        if s.not_stored:
            console.print(f"[red]{s.not_stored} answers were generated but not stored in L2[/] "
                          f"({escape(s.l2_error)}); run again to warm them")
        if json_out:
            data.buffer.write(orjson.dumps(s.as_dict()) + b"\n")
    if not s.ok:
        raise typer.Exit(2)


@app.command("serve")
@fails_cleanly
def serve_cmd(
    index: Annotated[Path, typer.Argument(help="An index folder (from build-index).")],
    host: Annotated[Optional[str], typer.Option(help="Address to bind (server.host; default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (server.port; default 8000; 0 picks a free one).")] = None,
    api_keys: Annotated[Optional[Path], typer.Option(
        "--api-keys", help="JSON file mapping API key to namespace (server.api_keys_file).")] = None,
    admin_key: Annotated[Optional[str], typer.Option(
        help="Key for /admin endpoints (server.admin_key). Visible to every user in the process list: prefer "
             "RAGSERVE_SERVER_ADMIN_KEY or --admin-key-file.")] = None,
    admin_key_file: Annotated[Path | None, typer.Option(
        "--admin-key-file", help="A file holding the /admin key (server.admin_key_file).")] = None,
    grace: Annotated[Optional[float], typer.Option(
        help="Seconds requests in flight may take to finish after SIGTERM (server.drain_grace_s).")] = None,
    redis_url: Annotated[Optional[str], typer.Option(
        help="L2 Redis URL (cache.redis_url); default: an embedded Redis persisted under RAGSERVE_HOME.")] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Run as a Ray Serve application: N ingress replicas and a generator deployment (one per "
                      "group of \\[models]); needs --redis-url (see deploy/README.md).")] = False,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="--ray: the cluster (ray.address): 'auto' joins `ray start` on this machine, "
                              "or HOST:6379; default: a local cluster for this process.")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="--ray: ingress replicas (ray.replicas).")] = None,
    ready_file: Annotated[Optional[Path], typer.Option(hidden=True)] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve INDEX over HTTP: native API, OpenAI-compatible API, /health, /ready, /metrics
    and a page at /. Opens the index, warms the engine, then accepts requests; SIGTERM
    drains. Options override the config file and RAGSERVE_* env vars.

    With --ray the same API runs on a Ray cluster as a Ray Serve application, with the
    replicas and bounds of the config's ray section."""
    from ragserve.server.logs import configure

    configure()  # text until the config is read: its own errors are logged too
    if admin_key is not None:
        console.print("[yellow]warning[/]: --admin-key is visible to every user of this machine in the process "
                      "list; set RAGSERVE_SERVER_ADMIN_KEY or use --admin-key-file instead")
    cfg = load_config(config, server={"host": host, "port": port, "api_keys_file": str(api_keys) if api_keys else None,
                                  "admin_key": admin_key, "drain_grace_s": grace,
                                  "admin_key_file": str(admin_key_file) if admin_key_file else None},
                  cache={"redis_url": redis_url}, ray={"address": ray_address, "replicas": replicas})
    if cfg.server.log_format != "text":
        configure(cfg.server.log_format)
    if ray:
        from ragserve.ray.serve.run import serve_on_ray

        serve_on_ray(index, cfg, ready_file=ready_file,
                     printer=lambda line: console.print(line, highlight=False))
        return
    if ray_address is not None or replicas is not None:
        raise typer.BadParameter("--ray-address and --replicas go with --ray")
    from ragserve.server import serve_index

    console.print(f"serving {index} on http://{cfg.server.host}:{cfg.server.port} (warming the engine first)")
    serve_index(index, cfg, ready_file=ready_file)
