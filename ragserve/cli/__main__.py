"""``python -m ragserve.cli``: the ``ragserve`` command."""

from ragserve.cli import main

if __name__ == "__main__":
    main()
