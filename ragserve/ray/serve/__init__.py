"""``ragserve serve --ray``: the HTTP API of ``ragserve serve`` as a Ray Serve application.

Two deployments in one application (``app.py`` builds it):

- ``RagserveIngress`` (``ingress.py``): the FastAPI app of ``ragserve.server`` as it is,
  behind Serve's HTTP proxy, N replicas (or autoscaled). Each holds the embedding model,
  the memory-mapped index and its own L1; the L2 Redis is shared, so a URL is required.
- ``RagserveGenerator`` (``generator.py``): the generator ``generate.backend`` names (vLLM
  in the replica, or the ``openai`` backend's servers), called by every ingress replica
  through a ``DeploymentHandle`` (``client.py``: ``RayGenerator``, a ``types.Generator``).

``proxy.py`` gives Serve's own refusals (its queue bound, an unavailable replica) the JSON
shape of ragserve's errors; ``run.py`` is the CLI's runner; ``config/ray.py`` the ``[ray]``
section. Nothing here imports Ray at module level: ``import ragserve`` stays light.

**Usage:** ``ragserve serve indexes/docs --ray --redis-url redis://cache:6379/0``, or in a
Serve config file / KubeRay ``RayService``: ``import_path: ragserve.ray.serve.app:build_app``.
"""
