"""`generate.task: instructions`: self-instruct `{prompt, completion}` records grown from seed records.

The seeds are the data's records (`data.train`, mixed as every job mixes them): the instruction is the
prompt (`data.promptField`; a chat's last user turn), the output the `data.completionField` when the
record has one. The job makes `requests` instruction-writing prompts; request r shows
`seedsPerRequest` seeds drawn at random (seeded by `training.seed` and r) as `{examples}` of
`instructionTemplate`, each as

    Instruction: <the seed's prompt>
    Output: <the seed's completion>          (left out when the seed has none)

with a blank line between seeds. Each request is sampled `candidates` times; a reply becomes an
instruction by keeping its text up to the first blank line or `Output:` line, without a leading
`Instruction:` / `Task:` label or list marker. Then, in sampling order:

- `empty`: nothing is left (a request too long for `training.maxSeqLength` is not sent and counted in
  `requests_too_long`);
- `duplicate`: equal to a seed or a kept instruction after normalisation (lowercase words);
- `similar_to_seed` / `near_duplicate`: ROUGE-L F1 with a seed / a kept instruction above `maxSimilarity`;
- otherwise it is kept and answered: `outputTemplate` filled with it, one sample; an empty answer is
  dropped (`empty_outputs`).

With `chat` (the default) requests and instructions go to the model as a user turn through its chat
template. Records are `{"prompt": instruction, "completion": output}` as plain text, what an sft job
reads by default. The diversity report (summary.json, manifest.json) gives distinct-1 / distinct-2 and
the word-length spread of the kept instructions and outputs (`textstats.py`). A job that keeps nothing
fails with the count and writes no train.jsonl.
"""

from __future__ import annotations

import random
import re
from typing import Any

from posttrain.jobs.algorithms import textstats

COUNTS = ("requests", "requests_too_long", "generated", "empty", "duplicate", "similar_to_seed", "near_duplicate", "empty_outputs",
          "kept")
LABEL = re.compile(r"^\s*(?:(?:new\s+)?(?:instruction|task)\s*\d*\s*[:.)-]|\d+\s*[.)]|[-*])\s*", re.IGNORECASE)
OUTPUT_LINE = re.compile(r"^\s*(?:output|answer|response)\s*:", re.IGNORECASE)


def clean_instruction(reply: str) -> str:
    """The instruction in a model's reply ("" when none).

    >>> clean_instruction("Instruction: Name a prime number.\\nOutput: 7")
    'Name a prime number.'
    >>> clean_instruction("1. Write a haiku.\\n\\nAnother task")
    'Write a haiku.'
    """
    text = reply.strip().split("\n\n", 1)[0]
    lines = []
    for line in text.splitlines():
        if OUTPUT_LINE.match(line):
            break
        lines.append(line)
    return LABEL.sub("", "\n".join(lines).strip(), count=1).strip()


def seed_pairs(prompts: list[Any], completion_field: str) -> list[tuple[str, str | None]]:
    """(instruction, output or None) of each seed record."""
    pairs = []
    for p in prompts:
        raw = p.raw
        if isinstance(raw, list):
            raw = next((m["content"] for m in reversed(raw) if m.get("role") == "user"), "")
        out = p.fields.get(completion_field)
        if isinstance(out, list):
            out = "\n".join(str(m.get("content", "")) for m in out)
        pairs.append((str(raw).strip(), None if out is None else str(out).strip()))
    return pairs


def examples(seeds: list[tuple[str, str | None]]) -> str:
    """The `{examples}` block of a request."""
    return "\n\n".join(f"Instruction: {i}" + (f"\nOutput: {o}" if o else "") for i, o in seeds)


class Instructions:
    """The task's per-batch work (see `posttrain.jobs.algorithms.generate`); no actors of its own."""

    FORMAT = "prompt_completion"  # {prompt, completion}: sft's default

    def __init__(self, ctx: Any) -> None:
        self.gen, self.data, self.seed = ctx.spec.generate, ctx.spec.data, ctx.spec.training.seed
        self.counts = dict.fromkeys(COUNTS, 0)
        self.seeds: list[tuple[str, str | None]] = []
        self.pool: textstats.Dedup | None = None
        self.kept: list[dict[str, Any]] = []

    def units(self, prompts: list[Any]) -> list[int]:
        """One unit per request; the prompts are the seeds."""
        self.seeds = seed_pairs(prompts, self.data.completion_field)
        self.pool = textstats.Dedup(max_similarity=self.gen.max_similarity, seeds=[i for i, _ in self.seeds])
        return list(range(self.gen.requests))

    def request(self, unit: int) -> str:
        """The instruction-writing prompt of request `unit` (its seeds drawn by the job's seed and `unit`)."""
        rng = random.Random(self.seed * 1_000_003 + unit)
        shown = rng.sample(self.seeds, min(self.gen.seeds_per_request, len(self.seeds)))
        return self.gen.instruction_template.format(examples=examples(shown))

    def _as_prompt(self, text: str) -> Any:
        return [{"role": "user", "content": text}] if self.gen.chat else text

    def start(self) -> dict[str, Any]:
        return {}

    def batch(self, units: list[int], sampler: Any, step: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from posttrain.jobs.rl.batch import step_seed

        gen, before = self.gen, dict(self.counts)
        assert self.pool is not None  # units() ran first
        sampling = sampler.sampling(n=gen.candidates, max_new_tokens=gen.max_new_tokens,
                                    temperature=gen.temperature, top_p=gen.top_p)
        gens = sampler.texts([self._as_prompt(self.request(u)) for u in units], sampling,
                             step_seed(self.seed, step, 0))
        self.counts["requests"] += len(units)
        self.counts["requests_too_long"] += sum(1 for g in gens if not g.texts)  # not sent: see Sampler.texts
        new: list[str] = []
        for reply in (t for g in gens for t in g.texts):
            self.counts["generated"] += 1
            instruction = clean_instruction(reply)
            verdict = self.pool.check(instruction) if instruction else "empty"
            if verdict == "new":
                new.append(instruction)
            else:
                self.counts[verdict] += 1
        records: list[dict[str, Any]] = []
        if new:
            one = sampler.sampling(n=1, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                   top_p=gen.top_p)
            outs = sampler.texts([self._as_prompt(gen.output_template.format(instruction=i)) for i in new], one,
                                 step_seed(self.seed, step, 1))
            for instruction, g in zip(new, outs):
                output = g.texts[0].strip() if g.texts else ""
                if not output:
                    self.counts["empty_outputs"] += 1
                    continue
                records.append({"prompt": instruction, "completion": output})
        self.counts["kept"] += len(records)
        self.kept.extend(records)
        return records, {k: self.counts[k] - before[k] for k in COUNTS if not k.startswith("requests")}

    def finish(self, records: list[dict[str, Any]]) -> None:
        """Nothing kept is a failure with the count; the job then writes no data set."""
        if records:
            return
        c = self.counts
        why = ", ".join(f"{c[k]} {k.replace('_', ' ')}" for k in COUNTS[1:-1] if c[k] and k != "generated")
        raise ValueError(f"spec.generate: 0 of {c['generated']} generated instructions kept: {why}; nothing was "
                         "written (check spec.model, generate.instructionTemplate, maxSimilarity and maxNewTokens)")

    def report(self) -> dict[str, Any]:
        return {"instructions": textstats.diversity([r["prompt"] for r in self.kept]),
                "outputs": textstats.diversity([r["completion"] for r in self.kept])}

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "seeds": len(self.seeds), "diversity": self.report()}

    def manifest(self) -> dict[str, Any]:
        gen = self.gen
        return {"templates": {"instructionTemplate": gen.instruction_template, "outputTemplate": gen.output_template},
                "chat": gen.chat, "requests": gen.requests, "seedsPerRequest": gen.seeds_per_request,
                "maxSimilarity": gen.max_similarity, "seeds": len(self.seeds), "diversity": self.report()}

    def close(self) -> None:
        pass
