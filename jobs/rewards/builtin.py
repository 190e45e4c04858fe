r"""Built-in reward functions.

Every function here has the one reward signature (see `posttrain.jobs.rewards`):

    fn(prompts: list[str], completions: list[str], **fields) -> list[float | None]

`fields` holds the data set's other columns, one list per column with one
entry per sample (`answer=[...]`); a function takes the columns it needs as
keyword arguments and ignores the rest through `**_`. `None` means "not
applicable to this sample" and is left out of the weighted sum.

Parameters (`target`, `buffer`, ...) are keyword-only: bind them with
`functools.partial` or with `kwargs` of a `RewardFunction` spec. Name a
built-in as `posttrain.jobs.rewards.builtin:<function>`.

Each function has a doctest; run them with
`python -m pytest --doctest-modules jobs/rewards/builtin.py` (or `tests/test_rewards.py`).
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import textwrap
from typing import Any, Callable

__all__ = ["exact_answer", "format", "length_penalty", "docstring", "step_count", "equation_steps", "reasoning_steps",
           "final_number", "parse_number"]

# A number: optional sign (not glued to a word, so "10-3" is 10 and 3), digits with optional
# thousands commas, optional decimals, then an optional exponent or "/denominator".
# `\d` matches any Unicode decimal digit and float() accepts them all ("٤٢" and "４２" are 42);
# superscripts ("m²") are not decimal digits, so they are not numbers.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.])[-+])?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:(?P<exp>[eE][-+]?\d+)|/(?P<den>\d+(?:\.\d+)?))?"
)
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _numbers(text: str) -> list[float]:
    text = text.translate(_MINUS_SIGNS)
    out = []
    for m in _NUMBER.finditer(text):
        value = float(m["num"].replace(",", "") + (m["exp"] or ""))
        if m["den"] is not None:
            den = float(m["den"])
            if den == 0:
                continue
            value /= den
        out.append(-value if m["sign"] == "-" else value)
    return out


def parse_number(text: Any) -> float | None:
    """The last number in `text` (a str or a number), or None.

    >>> parse_number("#### 1,234"), parse_number(-0.5), parse_number("3/4"), parse_number("none")
    (1234.0, -0.5, 0.75, None)
    """
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    found = _numbers(str(text))
    return found[-1] if found else None


def final_number(completion: str) -> float | None:
    """The final answer as a number: the last number inside the last `<answer>…</answer>`
    if the completion has one (None when that block holds no number), else the last
    number anywhere.

    >>> final_number("<think>2 + 2 = 4, plus 1</think><answer>5</answer>")
    5.0
    >>> final_number("so the total is −12.5 dollars"), final_number("<answer>none</answer> 7")
    (-12.5, None)
    """
    tagged = _ANSWER_TAG.findall(completion)
    return parse_number(tagged[-1] if tagged else completion)


def exact_answer(prompts: list[str], completions: list[str], *, answer: list[Any], **_: Any) -> list[float | None]:
    """1.0 when the completion's final number equals `answer`, else 0.0.

    The final number comes from `final_number` (the `<answer>` block if present,
    else the last number). `answer` entries may be numbers or strings (the last
    number in the string counts, so GSM8K's "... #### 72" works). Numbers are
    equal within 1e-9 relative or 1e-6 absolute tolerance, so "0.5" matches
    "1/2" but 1000000 does not match 1000001. A sample whose `answer` holds no
    number gets None (not applicable).

    >>> exact_answer(["1+1?"] * 4,
    ...              ["<answer>2</answer>", "it is 2.0", "<answer>3</answer> not 2", "no idea"],
    ...              answer=[2, "2", "#### 2", 2])
    [1.0, 1.0, 0.0, 0.0]
    >>> exact_answer(["?"], ["-3"], answer=[None])
    [None]
    """
    out: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        expected = parse_number(gold)
        if expected is None:
            out.append(None)
            continue
        got = final_number(completion)
        ok = got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-6)
        out.append(1.0 if ok else 0.0)
    return out


# Text holding no <think>/<answer> tag, so a nested or repeated tag fails the format.
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>({_NO_TAG})</answer>\s*", re.DOTALL)


def format(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:  # noqa: A001 - the spec name
    r"""1.0 when the completion is `<think>…</think><answer>…</answer>`, else 0.0.

    Whitespace around and between the blocks is allowed; the think block may be
    empty, the answer may not; no other text and no nested or repeated tags.

    >>> format(["q"] * 4, ["<think>\n1+1=2\n</think>\n<answer>2</answer>\n",
    ...                    "<answer>2</answer>",
    ...                    "<think>x</think><answer> </answer>",
    ...                    "<think>x</think><answer>2</answer> trailing words"])
    [1.0, 0.0, 0.0, 0.0]
    """
    out: list[float | None] = []
    for completion in completions:
        m = _FORMAT.fullmatch(completion)
        out.append(1.0 if m and m.group(1).strip() else 0.0)
    return out


_LENGTHS: dict[str, Callable[[str], int]] = {"chars": len, "words": lambda s: len(s.split())}


def length_penalty(prompts: list[str], completions: list[str], *, target: int = 1024, buffer: int = 256,
                   length: str | Callable[[str], int] = "chars", **_: Any) -> list[float | None]:
    """A soft penalty for completions longer than `target`: 0.0 up to `target`,
    then falling linearly to -1.0 at `target + buffer`, and -1.0 beyond.

    This is DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476,
    eq. 13) with L_max - L_cache = `target` and L_cache = `buffer`.

    Parameters (keyword-only; bind them with `functools.partial` or spec kwargs):
      target: length (in `length` units) up to which there is no penalty.
      buffer: how far past `target` the penalty reaches -1.0; must be > 0.
      length: "chars" (default), "words", or a callable `str -> int`, e.g.
              `lambda s: len(tokenizer.encode(s))` to count tokens.

    >>> length_penalty(["q"] * 4, ["a" * 8, "a" * 10, "a" * 11, "a" * 99], target=10, buffer=4)
    [0.0, 0.0, -0.25, -1.0]
    >>> from functools import partial
    >>> partial(length_penalty, target=2, buffer=2, length="words")(["q"], ["one two three"])
    [-0.5]
    """
    measure = _LENGTHS.get(length) if isinstance(length, str) else length
    if measure is None:
        raise ValueError(f"length_penalty: length={length!r}; use 'chars', 'words' or a callable str -> int")
    if target < 0 or buffer <= 0:
        raise ValueError(f"length_penalty: need target >= 0 and buffer > 0, got target={target}, buffer={buffer}")
    out: list[float | None] = []
    for completion in completions:
        over = measure(completion) - target
        out.append(0.0 if over <= 0 else -min(over / buffer, 1.0))
    return out


SUMMARY_MAX = 100  # characters; a longer first line is not a one-line summary


def _function_params(prompt: str) -> list[str] | None:
    """Parameter names of the first `def` in `prompt` (self/cls dropped), or None if there is none.

    The prompt is prose around code, so parse only the function header: from a
    line starting with `def`, grow the chunk a line at a time until it parses
    (alone, or with a `pass` body added), which also handles multi-line signatures.
    """
    lines = prompt.splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"\s*(async\s+)?def\s", line):
            continue
        chunk = ""
        for nxt in lines[i:i + 40]:
            chunk += nxt.strip() + "\n"
            for candidate in (chunk, chunk + "    pass\n"):
                try:
                    node = ast.parse(candidate).body[0]
                except (SyntaxError, ValueError, IndexError):
                    continue
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = node.args
                    every = [*a.posonlyargs, *a.args, *([a.vararg] if a.vararg else []),
                             *a.kwonlyargs, *([a.kwarg] if a.kwarg else [])]
                    return [p.arg for p in every if p.arg not in ("self", "cls")]
    return None


def _docstring_text(completion: str) -> str:
    """The docstring a completion proposes: from a whole function, a string literal, or plain text."""
    text = completion.strip()
    fence = re.search(r"```[\w+-]*[ \t]*\n(.*?)```", text, re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    try:
        tree = ast.parse(textwrap.dedent(text))
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return ast.get_docstring(node) or ""  # a function without a docstring earns nothing
        first = tree.body[0] if tree.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            return inspect.cleandoc(first.value.value)
    quoted = re.search(r"(\"\"\"|''')(.*?)\1", text, re.DOTALL)
    return inspect.cleandoc(quoted.group(2) if quoted else text)


def docstring(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
    r'''Scores a docstring written for the function in the prompt, 0.0 to 1.0.

    Half the score is a one-line summary: the first line is non-blank, at most
    `SUMMARY_MAX` characters, and is the only line or followed by a blank line.
    The other half is the fraction of the parameters of the first function in
    the prompt (parsed with `ast`; `self`/`cls` left out; full marks when there are none)
    named in the docstring as whole words. The completion may be the bare text,
    a triple-quoted string, or the whole function (its docstring is used). An
    empty docstring scores 0.0; a prompt with no parsable `def` gives None.

    >>> prompt = "Write a docstring for this function:\n\ndef scale(x, factor=2):\n    return x * factor\n"
    >>> docstring([prompt] * 3, ['"""Scale a number.\n\nReturns x times factor."""',
    ...                          "Scale x.",
    ...                          "Scales a number\nby a factor."])
    [1.0, 0.75, 0.25]
    >>> docstring(["Summarize this text."], ["A summary."])
    [None]
    '''
    out: list[float | None] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        params = _function_params(prompt)
        if params is None:
            out.append(None)
            continue
        doc = _docstring_text(completion)
        if not doc.strip():
            out.append(0.0)
            continue
        lines = doc.splitlines()
        summary = lines[0].strip()
        has_summary = 0 < len(summary) <= SUMMARY_MAX and (len(lines) == 1 or not lines[1].strip())
        named = sum(1 for p in params if re.search(rf"(?<!\w){re.escape(p)}(?!\w)", doc))
        coverage = named / len(params) if params else 1.0
        out.append(0.5 * has_summary + 0.5 * coverage)
    return out


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def step_count(prompts: list[str], completions: list[str], *, target: int = 3, **_: Any) -> list[float | None]:
    r"""A toy process reward: min(steps, target) / target, where steps are the
    non-blank lines of the `<think>` block; None when there is no such block.

    It rewards showing intermediate steps, not their correctness; a learned
    process reward model would score each step instead.

    >>> step_count(["q"] * 3, ["<think>a\nb\n\nc\nd</think>4", "<think>one step</think>", "4"], target=3)
    [1.0, 0.3333333333333333, None]
    """
    if target <= 0:
        raise ValueError(f"step_count: target must be > 0, got {target}")
    out: list[float | None] = []
    for completion in completions:
        m = _THINK.search(completion)
        if m is None:
            out.append(None)
            continue
        steps = sum(1 for line in m.group(1).splitlines() if line.strip())
        out.append(min(steps, target) / target)
    return out


def reasoning_steps(completion: str) -> list[str]:
    r"""The steps of a completion as process rewards see them: its non-blank lines, in order.

    A process reward returns one score per such line; the RL driver puts each
    score on the token that ends the line.

    >>> reasoning_steps("2 + 3 = 5\n\n5 * 2 = 10\nanswer: 10")
    ['2 + 3 = 5', '5 * 2 = 10', 'answer: 10']
    """
    return [line for line in completion.split("\n") if line.strip()]


_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x×])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")


def equation_steps(prompts: list[str], completions: list[str], *, wrong: float = -1.0,
                   **_: Any) -> list[list[float] | None]:
    r"""A process reward for arithmetic reasoning: per step (non-blank line), 1.0 when the line holds an
    equation `a op b = c` that is right, `wrong` when it is wrong, 0.0 when it holds none.
    None for a completion without any step. Needs `rl.advantage: grpo_process`.

    >>> equation_steps(["q"], ["2 + 3 = 5\nthen 5 * 2 = 11\nso the answer is 11"])
    [[1.0, -1.0, 0.0]]
    """
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "x": lambda a, b: a * b,
           "×": lambda a, b: a * b, "/": lambda a, b: a / b if b else math.nan}
    out: list[list[float] | None] = []
    for completion in completions:
        scores = []
        for line in reasoning_steps(completion):
            m = _EQUATION.search(line)
            if m is None:
                scores.append(0.0)
                continue
            a, op, b, c = float(m[1]), m[2], float(m[3]), float(m[4])
            scores.append(1.0 if math.isclose(ops[op](a, b), c, rel_tol=1e-9, abs_tol=1e-9) else float(wrong))
        out.append(scores or None)
    return out
