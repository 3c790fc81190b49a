"""From a question to its sources: embedding, vector search, document loading.

- ``embed.py``: the sentence-transformers embedder and the micro-batcher;
- ``faiss_index.py``: the float16 FAISS index (``FaissIndex``), memory-mapped;
- ``index_spec.py``: the index types and how one is chosen by corpus size;
- ``docstore.py``: the lazy docstore (only the top-k chunks are read);
- ``retriever.py``: ``Retriever``, the three stages for one question, micro-batched.
"""
