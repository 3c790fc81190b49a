"""``python -m ragserve.cli``: the ``ragserve`` command."""

from ragserve.cli import run

if __name__ == "__main__":
    run()
