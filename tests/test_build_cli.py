"""``ragserve build-index`` options for living corpora: incremental summary, --dry-run,
--full, --notify (against a real local HTTP server)."""

from __future__ import annotations

import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from typer.testing import CliRunner

from ragserve.build.notify import notify_reload
from ragserve.cli.main import app
from ragserve.index.verify import verify
from ragserve.testing.embedders import sharing

from .test_incremental import _edit

pytestmark = pytest.mark.integration


@pytest.fixture
def reload_server():
    """A real HTTP server recording each POST; ``status[0]`` is what it answers."""
    seen, status = [], [200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the name http.server calls
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": orjson.loads(body)})
            self.send_response(status[0])
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"reloaded": true}' if status[0] == 200 else b'{"detail": "bad admin key"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/admin/reload", seen, status
    server.shutdown()
    server.server_close()


@pytest.fixture
def shared_model(replay_embedder):
    """Each in-process command gets the session's model (not a load per command); the
    commands' output is under test here, not the model."""
    with sharing(replay_embedder):
        yield


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/admin/reload"


def _snapshot(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _run(*args):
    result = CliRunner().invoke(app, ["build-index", *map(str, args)])
    return result.exit_code, " ".join(result.output.split())


def test_build_index_cli_incremental_dry_run_full_and_notify(tmp_path, xquad_corpus, reload_server,
                                                            shared_model):
    url, seen, status = reload_server
    src, out = tmp_path / "src", tmp_path / "indexes" / "x"
    shutil.copytree(xquad_corpus[0], src)
    code, text = _run(src, "--out", out)
    assert code == 0 and "full build (no index at this path yet)" in text
    n_files = len(list(src.glob("*.txt")))

    changed, deleted, added = _edit(src)
    before = _snapshot(tmp_path / "indexes")
    code, text = _run(src, "--out", out, "--dry-run")
    assert code == 0 and _snapshot(tmp_path / "indexes") == before  # nothing written
    assert f"dry run: nothing written to {out}" in text
    assert f"incremental: files unchanged {n_files - 2}, changed 1, added 1, deleted 1" in text
    assert f"changed: {changed}" in text and f"added: {added}" in text and f"deleted: {deleted}" in text

    code, text = _run(src, "--out", out, "--notify", url, "--admin-key", "s3cret")
    m = verify(out)
    embedded = sum(m.data["corpus"]["files"][f]["chunks"] for f in (changed, added))
    assert code == 0 and (f"incremental: files unchanged {n_files - 2}, changed 1, added 1, deleted 1; "
                          f"chunks embedded {embedded} of {m.data['counts']['chunks']}") in text
    assert f"notified {url} answered 200" in text
    assert seen == [{"path": "/admin/reload", "auth": "Bearer s3cret",
                     "body": {"index": str(out), "fingerprint": m.fingerprint}}]

    code, text = _run(src, "--out", out)
    assert code == 0 and f"index up to date {out}: no file changed, no new version written" in text

    status[0] = 401  # a failed notify is reported; the build still succeeds
    code, text = _run(src, "--out", out, "--full", "--notify", url)
    assert code == 0 and "full build (--full was given)" in text
    assert "notify failed (the index is built)" in text and "answered 401" in text and "bad admin key" in text
    assert seen[-1]["auth"] is None and seen[-1]["body"]["fingerprint"] == verify(out).fingerprint

    code, text = _run(src, "--out", out, "--chunk-size", "128", "--notify", _closed_port_url())
    assert code == 0 and "full build (chunking changed: chunk_size 256 → 128)" in text
    assert "notify failed (the index is built): could not reach" in text

    verified = CliRunner().invoke(app, ["verify-index", str(out)])
    assert verified.exit_code == 0 and f"(version {verify(out).folder.name})" in verified.output


def test_notify_reload_results(reload_server):
    url, seen, status = reload_server
    ok = notify_reload(url, index="indexes/x", fingerprint="f" * 64, admin_key="k")
    assert ok.ok and ok.status == 200 and seen[-1]["auth"] == "Bearer k"
    status[0] = 503
    assert not notify_reload(url, index="indexes/x", fingerprint="f" * 64).ok
    bad = notify_reload("not a url", index="indexes/x", fingerprint="f" * 64)
    assert not bad.ok and bad.status is None


def test_an_unknown_forced_encoding_is_refused_before_anything_is_read(tmp_path, xquad_corpus):
    """Not a bare LookupError from the first file's decode: a typed error naming the value,
    and no index folder written."""
    src, _ = xquad_corpus
    out = tmp_path / "idx"
    code, text = _run(src, "--out", out, "--encoding", "bogus-8")
    assert code != 0
    assert "'bogus-8' is not a text encoding" in text and "Traceback" not in text
    assert not out.exists()
