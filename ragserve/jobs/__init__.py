"""Offline uses of ``RAG``: ``ragserve batch`` (``batch.py``) and ``ragserve warm`` (``warm.py``).
"""
