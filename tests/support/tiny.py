"""Tiny models and data made on the fly: no hub, no network.

A byte-level BPE tokenizer trained offline on generated text, and a random
Llama with a few thousand parameters per layer. Training on `arith_records`
drives the loss down within a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["add", "sum", "the", "answer", "is", "think", "reason", "def", "return", "value", "user", "assistant",
             "prompt", "completion", "docstring", "parameter", "step", "first", "then", "so"]
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{rng.choice(words)} {a} + {b} = {a + b} {rng.choice(words)} {rng.choice(words)}")
    return lines


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_model(folder: Path, *, tied: bool = False, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A random-weight Llama saved with its tokenizer into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tied,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def arith_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append({"prompt": f"add {a} + {b} =", "completion": f" the answer is {a + b}"})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pair_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs over `arith_records`: the right sum is chosen, a wrong one in other words rejected
    (the wording makes the preference learnable by a tiny random model in a few steps)."""
    rng = random.Random(seed + 1)
    out = []
    for r in arith_records(n, seed):
        right = int(r["completion"].rsplit(" ", 1)[1])
        out.append({"prompt": r["prompt"], "chosen": r["completion"],
                    "rejected": f" so value {right + rng.choice([-3, -2, -1, 1, 2, 3])} then"})
    return out


def unpaired_records(n: int, seed: int = 0) -> list[dict]:
    """KTO records: each pair of `pair_records` as a desirable and an undesirable completion."""
    out: list[dict] = []
    for r in pair_records(n, seed):
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out
