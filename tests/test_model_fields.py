"""Every field of spec.model reaches the processes that load the model: the GRPO learner and the PPO critic.

The model here has code of its own (a config `auto_map` to modules in its folder, as hub models with
custom architectures ship): it loads only when `model.trustRemoteCode` reaches `from_pretrained`.
The learner and critic used to rebuild `ModelSpec(source=..., dtype=...)` and dropped the field
(and `gradientCheckpointing` with it).

    pytest -m slow tests/test_model_fields.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from support.jobs import rl_job

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

CONFIGURATION = '''
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "posttrain_tiny_custom"
'''
MODELING = '''
from transformers import LlamaForCausalLM, LlamaModel

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomModel(LlamaModel):
    config_class = TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> Path:
    folder = tiny.make_model(tmp_path_factory.mktemp("custom") / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="posttrain_tiny_custom", architectures=["TinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModel": "modeling_tiny_custom.TinyCustomModel",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny_custom.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny_custom.py").write_text(MODELING)
    return folder


def setup_one(cls, job):
    from posttrain.jobs.rl.workers.sharded import free_port

    actor = ray.remote(num_cpus=1)(cls).remote()
    ray.get(actor.setup.remote(job, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port()))
    return actor


def loaded(actor, part: str) -> tuple[str, bool]:
    """(class name of the loaded module, whether gradient checkpointing is on) inside the actor."""
    def probe(self):
        module = getattr(self.model, part) if part else self.model
        return type(module).__name__, bool(getattr(module, "is_gradient_checkpointing", False))

    return ray.get(actor.call.remote(probe))


@pytest.mark.parametrize("algorithm, worker, part", [("grpo", "learner", ""), ("ppo", "critic", "backbone")])
def test_trust_remote_code_and_gradient_checkpointing_reach_the_worker(custom_model, ray_local, algorithm, worker,
                                                                        part):
    from posttrain.jobs.rl.workers.critic import CriticWorker
    from posttrain.jobs.rl.workers.learner import LearnerWorker

    cls = LearnerWorker if worker == "learner" else CriticWorker
    job = rl_job(custom_model, algorithm=algorithm, model={"trustRemoteCode": True, "gradientCheckpointing": True})
    actor = setup_one(cls, job)
    try:
        name, checkpointing = loaded(actor, part)
    finally:
        ray.kill(actor)
    assert "TinyCustom" in name and checkpointing, (name, checkpointing)

    plain = rl_job(custom_model, algorithm=algorithm, model={"trustRemoteCode": True})
    actor = setup_one(cls, plain)
    try:
        assert loaded(actor, part)[1] is False
    finally:
        ray.kill(actor)
    with pytest.raises(Exception, match="trust_remote_code"):  # the model's own code is not run without it
        setup_one(cls, rl_job(custom_model, algorithm=algorithm))
