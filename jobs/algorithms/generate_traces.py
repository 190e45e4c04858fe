"""`generate.task: traces`: chain-of-thought distillation data, `{prompt, reasoning, answer}` records.

For each prompt the model (the teacher, `spec.model` on the rollout role) answers `traceTemplate`
filled with the record's question (a chat's last user turn; the chat's other turns stay) `candidates`
times. From each trace:

- the final answer is read with `spec.generate.answer.extract` (as `algorithm: evaluate` reads it); a
  trace with no answer is dropped (`no_answer`): a cot record needs one;
- the reasoning is the trace without its last non-empty line when that line holds the answer and
  something comes before it (the "so the answer is 19" line), else the whole trace;
- with `verify`, the answer is compared with the record's answer field (`data.answerField`, metric
  `match`, numbers within `tolerance`): a wrong one is dropped (`wrong`); a record without that field
  keeps its traces unverified (`unverified`); without `verify` every trace with an answer is kept.

At most `keepPerPrompt` traces are kept per prompt, in sampling order, a repeated text once. A record
is what an sft job with `format: cot` reads without any field mapping; `prompt` is the record's prompt
as given (the template is not part of it: the student learns to reason from the bare question):

    {"prompt": "Ana has 12 apples. ...", "reasoning": "12 + 3 * 4 = 24. 24 - 5 = 19.", "answer": "19",
     "verified": true}

The keep rate (kept / traces) is in every metrics line, summary.json and the manifest. A job that keeps
nothing fails with the count ("0 of 64 traces kept: 40 wrong answers, 24 with no answer ...") and
writes no train.jsonl.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.jobs.evaluation import answers
from posttrain.jobs.evaluation.methods import fill

COUNTS = ("prompts", "prompts_too_long", "traces", "no_answer", "wrong", "correct", "unverified", "repeats",
          "over_limit", "kept")


def split_trace(text: str, extract: Callable[[str], str | None]) -> tuple[str, str] | None:
    """(reasoning, answer) of one trace, or None when no answer can be read.

    >>> split_trace("3 + 4 = 7.\\n7 * 2 = 14.\\nThe answer is 14.", answers.last_number)
    ('3 + 4 = 7.\\n7 * 2 = 14.', '14')
    >>> split_trace("3 + 4 = 7, and doubled that is 14.", answers.last_number)
    ('3 + 4 = 7, and doubled that is 14.', '14')
    >>> split_trace("no idea", answers.last_number) is None
    True
    """
    text = text.strip()
    answer = extract(text)
    if answer is None or not answer.strip():
        return None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    head = "\n".join(lines[:-1]).strip()
    if head and answer in lines[-1]:
        return head, answer.strip()
    return text, answer.strip()


def select(prompts: list[Any], texts: list[list[str]], *, extract: Callable[[str], str | None],
           match: Callable[[str, Any], float], verify: bool, keep: int, answer_field: str,
           counts: dict[str, int]) -> list[dict[str, Any]]:
    """The kept records of one batch (`texts[i]`: the traces of `prompts[i]`); adds to `counts`. Pure."""
    records: list[dict[str, Any]] = []
    for prompt, traces in zip(prompts, texts, strict=True):
        counts["prompts"] += 1
        if not traces:
            counts["prompts_too_long"] += 1  # the filled template did not fit: nothing was sampled
            continue
        reference = prompt.fields.get(answer_field)
        kept: list[str] = []
        for trace in traces:
            counts["traces"] += 1
            parts = split_trace(trace, extract)
            if parts is None:
                counts["no_answer"] += 1
                continue
            reasoning, answer = parts
            checked = verify and reference is not None
            if checked and match(answer, reference) != 1.0:
                counts["wrong"] += 1
                continue
            counts["correct" if checked else "unverified"] += 1
            if trace.strip() in kept:
                counts["repeats"] += 1
            elif len(kept) >= keep:
                counts["over_limit"] += 1
            else:
                kept.append(trace.strip())
                counts["kept"] += 1
                records.append({"prompt": prompt.raw, "reasoning": reasoning, "answer": answer, "verified": checked})
    return records


def keep_rate(kept: int, traces: int) -> float | None:
    return round(kept / traces, 6) if traces else None


class Traces:
    """The task's per-batch work (see `posttrain.jobs.algorithms.generate`); no actors of its own."""

    FORMAT = "cot"  # {prompt, reasoning, answer}: sft with data.train[].format cot

    def __init__(self, ctx: Any) -> None:
        self.gen, self.data, self.seed = ctx.spec.generate, ctx.spec.data, ctx.spec.training.seed
        self.extract = answers.extractor(self.gen.answer, base_dir=getattr(ctx, "base_dir", None),
                                         where="spec.generate.answer")
        self.match = answers.scorer(self.gen.answer)
        self.counts = dict.fromkeys(COUNTS, 0)

    def units(self, prompts: list[Any]) -> list[Any]:
        return prompts

    def start(self) -> dict[str, Any]:
        return {}

    def batch(self, prompts: list[Any], sampler: Any, step: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from posttrain.jobs.rl.batch import step_seed

        gen = self.gen
        sampling = sampler.sampling(n=gen.candidates, max_new_tokens=gen.max_new_tokens,
                                    temperature=gen.temperature, top_p=gen.top_p)
        asked = [fill(p.raw, gen.trace_template) for p in prompts]
        gens = sampler.texts(asked, sampling, step_seed(self.seed, step, 0))
        before = dict(self.counts)
        records = select(prompts, [list(g.texts) for g in gens], extract=self.extract, match=self.match,
                         verify=gen.verify, keep=gen.keep_per_prompt, answer_field=self.data.answer_field,
                         counts=self.counts)
        line = {k: self.counts[k] - before[k] for k in ("traces", "kept", "correct", "wrong", "no_answer",
                                                         "unverified")}
        return records, {**line, "keep_rate": keep_rate(line["kept"], line["traces"])}

    def finish(self, records: list[dict[str, Any]]) -> None:
        """Nothing kept is a failure with the count; the job then writes no data set."""
        if records:
            return
        c = self.counts
        why = [f"{c['wrong']} wrong answers" if c["wrong"] else "",
               f"{c['no_answer']} with no answer read by answer.extract {self.gen.answer.extract}"
               if c["no_answer"] else "",
               f"{c['prompts_too_long']} prompts too long with traceTemplate for training.maxSeqLength"
               if c["prompts_too_long"] else ""]
        raise ValueError(f"spec.generate: 0 of {c['traces']} traces kept: {', '.join(w for w in why if w)}; "
                         "nothing was written (check the teacher spec.model, generate.traceTemplate and "
                         "generate.answer, or set verify: false)")

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "keep_rate": keep_rate(self.counts["kept"], self.counts["traces"])}

    def manifest(self) -> dict[str, Any]:
        c, gen = self.counts, self.gen
        if not gen.verify:
            verification = "off (verify: false): every trace with an answer is kept"
        elif c["unverified"] and not (c["correct"] or c["wrong"]):
            verification = f"none: no record has a {self.data.answer_field!r} field; every trace with an answer is kept"
        elif c["unverified"]:
            verification = (f"partial: traces of records with a {self.data.answer_field!r} field are kept only when "
                            "their answer matches it; the others are kept unverified")
        else:
            verification = f"every kept trace's answer matches the record's {self.data.answer_field!r}"
        return {"templates": {"traceTemplate": gen.trace_template}, "answer": gen.answer.model_dump(mode="json"),
                "verify": gen.verify, "verification": verification, "keepPerPrompt": gen.keep_per_prompt,
                "keep_rate": keep_rate(c["kept"], c["traces"])}

    def close(self) -> None:
        pass
