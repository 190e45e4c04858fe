"""The judge worker: one Ray actor holding an LLM judge (a `posttrain.jobs.rewards.judge.Judge`) on the reward role.

    Judge = ray.remote(num_cpus=1)(JudgeWorker)
    j = Judge.remote()
    ray.get(j.setup.remote(spec.generate.judge.wire(), where="spec.generate.judge", on_error="raise"))
    scores = ray.get(j.candidate_scores.remote([(prompt, [c1, c2, c3]), ...]))   # one `CandidateScores` per prompt

What `algorithm: generate` labels preference pairs with; grpo/ppo judges are rewards on the `RewardWorker`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import ActorBase


@dataclass
class CandidateScores:
    """One prompt's candidates as the judge sees them: a score in [0, 1] each (None: no readable verdict),
    the judge's replies behind `reasons[(i, j)]` (pairwise: i against j; pointwise: (i, i)), and how many
    verdicts could not be read."""

    scores: list[float | None]
    reasons: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    preference: dict[tuple[int, int], float] = field(default_factory=dict)  # pairwise: P(i better than j)
    unparseable: int = 0


class JudgeWorker(ActorBase):
    """Loads the judge (vLLM where installed, else transformers) and scores the candidates of each prompt."""

    def setup(self, judge: dict[str, Any], *, where: str, on_error: str = "raise", seed: int = 0,
              threads: int | None = None, base_dir: str | None = None) -> dict[str, Any]:
        from posttrain.jobs.rewards.judge import Judge

        from .scorer import local_model

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.judge = Judge(local_model(judge["model"], base_dir), spec=judge, where=where, on_error=on_error, seed=seed)
        return {"engine": self.judge.engine.name, "mode": self.judge.spec.mode, "verdict": self.judge.spec.verdict}

    def candidate_scores(self, items: list[tuple[str, list[str]]]) -> list[CandidateScores]:
        if self.judge.spec.mode == "pairwise":
            out = []
            for prompt, candidates in items:
                ranking = self.judge.rank(prompt, candidates)
                out.append(CandidateScores(
                    scores=ranking.win_rates, unparseable=ranking.unparseable,
                    reasons={k: [v.reply for v in vs if v.reply] for k, vs in ranking.pairs.items()},
                    preference={k: sum(v.value for v in vs) / len(vs) for k, vs in ranking.pairs.items()}))  # type: ignore[misc]
            return out
        flat = [(p, c) for p, cands in items for c in cands]
        verdicts = self.judge.pointwise([p for p, _ in flat], [c for _, c in flat])
        out, k = [], 0
        for _, candidates in items:
            mine = verdicts[k:k + len(candidates)]
            k += len(candidates)
            out.append(CandidateScores(scores=[v.value for v in mine],
                                       reasons={(i, i): [v.reply] for i, v in enumerate(mine) if v.reply},
                                       unparseable=sum(v.value is None for v in mine)))
        return out

    def close(self) -> None:
        judge = getattr(self, "judge", None)
        if judge is not None:
            judge.close()
