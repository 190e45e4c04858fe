"""Evaluation and test-time scaling, the pure parts: answers (extraction, scoring), stats (majority vote,
95% intervals), methods (direct, cot, self_consistency, best_of_n, refine over any generate function) and
report (eval.json rows, report.md, plots). `posttrain.jobs.algorithms.evaluate` runs them on rollout actors.
"""
