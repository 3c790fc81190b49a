"""``python -m ragserve.cli``: the ``ragserve`` command."""

from ragserve.cli import app

app()
