"""Reward scorers that hold state: a reward model and an HTTP verifier.

Both are classes whose instances have the reward signature
`(prompts, completions, **fields) -> list[float | None]`, so a spec names them
like any reward and passes constructor arguments as kwargs:

    RewardFunction("posttrain.jobs.rewards.scorers:RewardModel", kwargs={"path": "/models/rm"})
    RewardFunction("posttrain.jobs.rewards.scorers:HttpVerifier", kwargs={"url": "http://verifier:8000/score"})

Construct them inside the reward actor: the model loads in `__init__`
(torch and transformers are imported there, not at module import).

Tests: `.venv/bin/python -m pytest tests/test_rewards.py -q`.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from posttrain.jobs.rewards.score import RewardError

log = logging.getLogger(__name__)


# The key of a reward model's `posttrain.json` that says how its training pairs were tokenized.
REWARD_INPUT = "reward_input"
_USER, _ANSWER = "\u2063posttrain-user\u2063", "\u2063posttrain-answer\u2063"  # never in a real chat


def reward_input(record: Mapping[str, Any]) -> dict[str, bool]:
    """How TRL's `RewardTrainer` tokenizes a training pair like `record` (what a scorer must repeat).

    Chat pairs (messages) go through the chat template, which closes the assistant turn itself;
    text pairs are `prompt + chosen` with the tokenizer's EOS appended.

    >>> reward_input({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    {'chat': False, 'eos': True}
    >>> reward_input({"prompt": [{"role": "user", "content": "2+2="}], "chosen": [{"role": "assistant", "content": "4"}]})
    {'chat': True, 'eos': False}
    """
    chat = isinstance(record.get("chosen"), list) or isinstance(record.get("prompt"), list)
    return {"chat": chat, "eos": not chat}


def _trained_input(folder: Path) -> dict[str, Any]:
    """The `reward_input` a posttrain reward job wrote beside the model; {} for any other model."""
    try:
        written = json.loads((folder / "posttrain.json").read_text())
    except (OSError, ValueError):
        return {}
    found = written.get(REWARD_INPUT) if isinstance(written, dict) else None
    return found if isinstance(found, dict) else {}


class RewardModel:
    """Scores `prompt + completion` with a sequence-classification model from a local folder.

    path: a folder `AutoModelForSequenceClassification` and `AutoTokenizer` load.
    label: which logit is the reward: None for a model with one label, else an
           index or a name from `config.label2id`.
    batch_size: texts per forward pass (texts are sorted by length to pad less).
    max_length: tokens kept per text; truncation drops the start (the prompt),
                never the end of the completion.
    chat: score the pair as a chat: a prompt already rendered by the chat template (what a
          grpo/ppo job with chat prompts passes) gets the completion and the template's end of
          the assistant turn; a plain prompt becomes [user: prompt, assistant: completion].
    eos: append the tokenizer's EOS token to a text (not chat) pair.
          chat and eos default to how the model was trained: a posttrain reward job writes
          this into the folder's posttrain.json (`reward_input`), so scoring tokenizes each
          pair exactly as TRL's RewardTrainer did; for other models both default to False.
    device, dtype: where and in which dtype to load ("auto" keeps the saved dtype).

    Returns the chosen logit per sample as a float (never None).
    """

    def __init__(self, path: str | Path, *, label: int | str | None = None, batch_size: int = 8,
                 max_length: int = 2048, chat: bool | None = None, eos: bool | None = None, device: str = "cpu",
                 dtype: str = "auto", name: str = "reward_model"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.batch_size, self.max_length, self.device = name, batch_size, max_length, device
        if batch_size < 1:
            raise RewardError(name, f"batch_size must be >= 1, got {batch_size}")
        folder = Path(path)
        if not folder.is_dir():
            raise RewardError(name, f"model path {str(folder)!r} is not a folder; give a local model folder")
        trained = _trained_input(folder)
        self.chat = bool(trained.get("chat", False)) if chat is None else chat
        self.eos = bool(trained.get("eos", False)) if eos is None else eos
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
        if self.model.config.pad_token_id is None:
            # The classification head reads the last non-pad token; it needs to know the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.index = self._label_index(label)
        if self.chat:
            self._opens, self._closes = self._assistant_turn()

    def _label_index(self, label: int | str | None) -> int:
        config = self.model.config
        n = config.num_labels
        labels = dict(getattr(config, "label2id", None) or {})
        if label is None:
            if n != 1:
                raise RewardError(self.name, f"the model has {n} labels {sorted(labels)}; choose one with label=")
            return 0
        if isinstance(label, str):
            if label not in labels:
                raise RewardError(self.name, f"label {label!r} is not one of the model's labels {sorted(labels)}")
            return int(labels[label])
        if not 0 <= label < n:
            raise RewardError(self.name, f"label index {label} is out of range for {n} labels")
        return label

    def _assistant_turn(self) -> tuple[str, str]:
        """(what the chat template writes after a user turn to open the assistant's, what it writes after
        the assistant's content to close it)."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise RewardError(self.name, "chat scoring needs a tokenizer with a chat template; this one has none "
                                         "(set chat: false in the reward's kwargs)")
        user = [{"role": "user", "content": _USER}]
        opened = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*user, {"role": "assistant", "content": _ANSWER}], tokenize=False)
        return opened[opened.rindex(_USER) + len(_USER):], full[full.rindex(_ANSWER) + len(_ANSWER):]

    def _render(self, prompt: str, completion: str) -> str:
        if not self.chat:
            eos = self.tokenizer.eos_token
            text = prompt + completion
            # TRL's rule: EOS is appended unless the text already ends with it
            return text + eos if self.eos and eos and not text.endswith(eos) else text
        if self._opens and prompt.endswith(self._opens):  # rendered by the template already (an RL job's chat prompt)
            return prompt + completion + self._closes
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        import torch

        texts = [self._render(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores: list[float | None] = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                # a rendered chat carries its special tokens already (as apply_chat_template tokenizes it)
                enc = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=not self.chat,
                                     return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits[:, self.index].float().tolist()
                for i, value in zip(chunk, logits):
                    scores[i] = value
        return scores


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class HttpVerifier:
    """Asks an HTTP service for rewards.

    POSTs `{"prompts": [...], "completions": [...], <field>: [...], ...}` as JSON to
    `url` and expects `{"rewards": [float | null, ...]}` back (status 2xx).

    timeout: seconds per attempt (connect and read).
    retries: further attempts after the first on a connection error, a timeout,
             or status 429/5xx; other 4xx statuses and malformed replies fail at once.
    backoff: seconds before the first retry, doubling each time (at most `max_backoff`).
    headers: extra request headers (e.g. an Authorization header).

    Raises `RewardError` naming the URL and the number of attempts when no
    attempt succeeds.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 30.0, headers: Mapping[str, str] | None = None, name: str = "http_verifier"):
        if not url.startswith(("http://", "https://")):
            raise RewardError(name, f"url {url!r} must start with http:// or https://")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise RewardError(name, f"need retries >= 0, timeout > 0, backoff >= 0; got {retries}, {timeout}, {backoff}")
        self.url, self.timeout, self.retries, self.backoff, self.max_backoff = url, timeout, retries, backoff, max_backoff
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        self.name = name

    def _fail(self, attempts: int, why: str) -> RewardError:
        return RewardError(self.name, f"POST {self.url} failed after {attempts} attempt(s): {why}")

    def _parse(self, attempts: int, body: bytes) -> list[float | None]:
        try:
            reply = json.loads(body)
        except ValueError as exc:
            raise self._fail(attempts, f"the reply is not JSON ({exc}): {body[:200]!r}") from None
        rewards = reply.get("rewards") if isinstance(reply, dict) else None
        if not isinstance(rewards, list):
            raise self._fail(attempts, f'the reply has no "rewards" list: {body[:200]!r}')
        # Passed on as sent: combine() validates the values and the length, naming this reward.
        return [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in rewards]

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float | None]:
        try:
            payload = json.dumps({**fields, "prompts": list(prompts), "completions": list(completions)},
                                 default=_jsonable).encode()
        except TypeError as exc:
            raise RewardError(self.name, f"cannot send the batch as JSON: {exc}") from exc
        attempts = self.retries + 1
        why = ""
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(min(self.backoff * 2 ** (attempt - 2), self.max_backoff))
            request = urllib.request.Request(self.url, data=payload, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                return self._parse(attempt, body)
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code} {exc.reason}"
                if exc.code != 429 and exc.code < 500:
                    raise self._fail(attempt, why) from None
            except (TimeoutError, socket.timeout):
                why = f"timed out after {self.timeout} s"
            except urllib.error.URLError as exc:
                timed_out = isinstance(exc.reason, (TimeoutError, socket.timeout))
                why = f"timed out after {self.timeout} s" if timed_out else f"cannot connect: {exc.reason}"
            except (ConnectionError, OSError) as exc:  # e.g. reset while reading the reply
                why = f"{type(exc).__name__}: {exc}"
            log.warning("reward %r: POST %s attempt %d/%d: %s", self.name, self.url, attempt, attempts, why)
        raise self._fail(attempts, why)
