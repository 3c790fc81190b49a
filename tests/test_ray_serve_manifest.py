"""deploy/kuberay-rayservice.yaml: its ``serveConfigV2`` is a valid Serve config, and the
application it names (``ragserve.ray_serve.app:build_app`` with its ``args``) deploys from
that config on a local Ray cluster the way KubeRay deploys it (the controller builds it
from the import path), with the sizes, index, Redis and generator of this machine."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from ragserve.cache.redis_server import free_port
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.redis import redis_server
from ragserve.testing.waits import CLUSTER_WAIT_S, HTTP_TIMEOUT_S, eventually

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kuberay-rayservice.yaml"


def serve_config() -> dict:
    manifest = yaml.safe_load(MANIFEST.read_text("utf-8"))
    assert manifest["kind"] == "RayService" and manifest["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    env = {e["name"] for e in manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert {"RAGSERVE_REDIS_URL", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"} <= env
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def test_the_manifests_serve_config_validates_and_names_a_real_builder():
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**serve_config())
    app = config.applications[0]
    assert import_attr(app.import_path).__name__ == "build_app"
    assert app.args["index"] and app.args["ray"]["replicas"] == 2


@pytest.mark.ray
@pytest.mark.redis
@pytest.mark.http
def test_the_manifests_application_deploys_from_its_serve_config(ray_cluster, xquad_index):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from ragserve.ray.serve import proxy

    raw = serve_config()
    app = raw["applications"][0]
    fake = FakeOpenAI(Behaviour())
    with redis_server() as redis, running(fake.app) as fake_url:
        # this machine instead of the cluster's: the index, 2 CPUs, no GPU, the fake generator
        app["args"]["index"] = str(xquad_index)
        app["args"]["ray"].update(replicas=1, num_cpus=0.5, generator_num_cpus=0.5, generator_num_gpus=0)
        app["args"].update(generate={"backend": "openai", "max_tokens": 8},
                           openai={"urls": [fake_url], "tokenizer": "server"})
        # as the pods' env in the manifest: read by build_app where the controller runs it
        app["runtime_env"] = {"env_vars": {"RAGSERVE_REDIS_URL": redis.url}}
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    controller_options={"runtime_env": {"env_vars": {proxy.ENV: proxy.CALLBACK}}})
        try:
            _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]), _blocking=True)
            url = f"http://127.0.0.1:{port}"
            # deployed: the replicas run; the proxy learns the route in its own time
            eventually(lambda: httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200,
                       CLUSTER_WAIT_S, 0.2, "Serve's proxy to route /health to the application",
                       ignore=(httpx.HTTPError,))
            r = httpx.post(f"{url}/v1/query", json={"question": "Who won Super Bowl 50?"},
                           timeout=HTTP_TIMEOUT_S)
            assert r.status_code == 200 and r.json()["answer"] == fake.b.reply, r.text
            assert httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT_S).json()["l2"] == "ok"  # the env's Redis
        finally:
            serve.delete(app["name"])
            serve.shutdown()
