"""The results of an evaluation: eval.json's rows, report.md's table and the PNG plots (pure but for the
plot files, which matplotlib draws headless).

    row = result_row("base", method_row, seed=0)       # score, 95% CI, tokens, seconds of one (model, method, N)
    markdown = report_markdown(doc)                    # the table of eval.json
    plot_scaling(doc, folder)                          # accuracy_vs_samples.png, accuracy_vs_tokens.png

`generations` is the x axis of "samples per prompt": N for self_consistency and best_of_n, 1 for direct
and cot, 1 + 2 x rounds for refine (each round is a critique and a revision; 1 + rounds with the verifier's
feedback instead of the model's critique).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .stats import ci95, mean

PLOTS = ("accuracy_vs_samples.png", "accuracy_vs_tokens.png")


def result_row(model: str, row: dict[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """One line of eval.json's `results` from a method's row (its per-prompt scores)."""
    scores = row["scores"]
    lo, hi = ci95(scores, seed=seed)
    prompts = len(scores)
    return {
        "model": model, "method": row["method"], "n": row["n"], "generations": row["generations"],
        "score": round(mean(scores), 6), "ci95": [round(lo, 6), round(hi, 6)], "prompts": prompts,
        "tokens": row["tokens"], "tokens_per_prompt": round(row["tokens"] / prompts, 2) if prompts else 0.0,
        "seconds": row["seconds"], "extraction_failures": row["extraction_failures"],
        "unanswered": row["unanswered"],
    }


def label(r: dict[str, Any]) -> str:
    """How a row is named in the table: the method, with N (or refine's round) where it has one."""
    if r["method"] in ("self_consistency", "best_of_n"):
        return f"{r['method']} N={r['n']}"
    if r["method"] == "refine":
        return f"refine round {r['n']}"
    return r["method"]


def report_markdown(doc: dict[str, Any]) -> str:
    """report.md: what was run, then one table row per (model, method, N)."""
    metric = doc.get("metric", "match")
    lines = [
        f"# Evaluation: {doc.get('job', '')}", "",
        f"{doc['prompts']} prompts, metric `{metric}`, seed {doc.get('seed', 0)}; 95% CI "
        f"({'Wilson' if metric == 'match' else 'Wilson for 0/1 scores, else bootstrap'}). "
        "`gen/prompt` counts completions per prompt; `failures` are completions with no extractable answer.", "",
        "| model | method | gen/prompt | score | 95% CI | tokens/prompt | seconds | failures |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in doc["results"]:
        lo, hi = r["ci95"]
        lines.append(f"| {r['model']} | {label(r)} | {r['generations']} | {r['score']:.3f} | "
                     f"[{lo:.3f}, {hi:.3f}] | {r['tokens_per_prompt']:.1f} | {r['seconds']:.1f} | "
                     f"{r['extraction_failures']} |")
    if doc.get("plots"):
        lines += ["", *(f"![{Path(p).stem}]({p})" for p in doc["plots"])]
    return "\n".join(lines) + "\n"


def series(doc: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The rows of each (model, method), in order of generations: one line of a plot each."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in doc["results"]:
        out.setdefault((r["model"], r["method"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["generations"]) for k, v in out.items()}


MARKERS = ("o", "s", "^", "D", "v", "P")
DASHES = ("-", "--", ":", "-.")


def plot_scaling(doc: dict[str, Any], folder: Path) -> list[str]:
    """Accuracy against samples per prompt (log2 x axis) and against generated tokens per prompt, one line
    per (model, method), the 95% CI as error bars; returns the files written (names relative to `folder`)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a pod or in CI
    import matplotlib.pyplot as plt

    written = []
    for name, x_key, x_label in ((PLOTS[0], "generations", "completions per prompt"),
                                 (PLOTS[1], "tokens_per_prompt", "generated tokens per prompt")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        lines = series(doc)
        # one colour per model, one marker and dash per method: 3 models x 4 methods stay apart (a colour
        # per line would repeat after ten)
        models = list(dict.fromkeys(model for model, _ in lines))
        methods = list(dict.fromkeys(method for _, method in lines))
        for (model, method), rows in lines.items():
            xs = [r[x_key] for r in rows]
            ys = [r["score"] for r in rows]
            err = [[r["score"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["score"] for r in rows]]
            k = methods.index(method)
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=f"{model}: {method}",
                        color=f"C{models.index(model) % 10}", marker=MARKERS[k % len(MARKERS)],
                        linestyle=DASHES[k % len(DASHES)])
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy" if doc.get("metric", "match") == "match" else f"score ({doc.get('metric')})")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{doc.get('job', '')}: {doc['prompts']} prompts")
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(name)
    return written
