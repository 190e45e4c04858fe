"""The floor of `operator_load.py`: a bare kopf operator that makes one RayJob per PostTrainingJob.

Nothing of posttrain is imported. On the creation of a PostTrainingJob it creates one RayJob
(the template in $FLOOR_TEMPLATE, a JSON file: the RayJob our operator would create for such a job)
named after the job, labelled `posttrain.dev/job=<job>` and owned by it (`kopf.adopt`), through
the same `kubernetes` client, thread pool size and API timeouts as our operator. At cleanup it
writes how many times its handler ran to $FLOOR_COUNT. Run by the benchmark:

    KUBECONFIG=... FLOOR_TEMPLATE=t.json FLOOR_COUNT=n.txt python -m kopf run --standalone benchmarks/floor_operator.py
"""

import asyncio
import copy
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import kopf
import kubernetes

TEMPLATE = json.loads(open(os.environ["FLOOR_TEMPLATE"], encoding="utf-8").read())
calls = {"n": 0}
api: dict = {}


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_):
    settings.posting.level = logging.WARNING  # as ours: no Event per handler log line
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=32))
    kubernetes.config.load_kube_config()
    cfg = kubernetes.client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = 32
    api["custom"] = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(cfg))


@kopf.on.create("posttrain.dev", "v1alpha1", "posttrainingjobs")
async def create_child(body, name, namespace, **_):
    calls["n"] += 1
    child = copy.deepcopy(TEMPLATE)
    child["metadata"] = {"name": f"{name}-r0", "namespace": namespace, "labels": {"posttrain.dev/job": name}}
    kopf.adopt(child, owner=body)
    try:
        await asyncio.to_thread(api["custom"].create_namespaced_custom_object, "ray.io", "v1", namespace, "rayjobs",
                                child, _request_timeout=(5.0, 30.0))
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise


@kopf.on.cleanup()
async def report(**_):
    with open(os.environ["FLOOR_COUNT"], "w", encoding="utf-8") as f:
        f.write(str(calls["n"]))
