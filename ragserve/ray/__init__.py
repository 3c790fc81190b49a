"""Scale-out on Ray: the cluster connection, ``build-index --ray``, ``batch --ray``, and
``serve --ray`` (the ``serve/`` folder: a Ray Serve application).

- ``cluster.py``: connecting to, or starting, a cluster; nothing imports Ray at module level;
- ``build.py``: embedding on an actor pool (Ray Data);
- ``batch.py``: ``ragserve batch --ray``.
"""
