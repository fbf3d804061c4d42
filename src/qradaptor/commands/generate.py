"""``qradaptor generate``: continue a prompt with a trained model (an export or a finished run directory)."""

from __future__ import annotations

import os

import torch

from ..device import model_device
from ..export import load_artifact


@torch.no_grad()
def generate(path: str | os.PathLike, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, device: str | None = None) -> str:
    """What ``qradaptor generate`` prints: the continuation of ``prompt`` (in the chat template when the
    tokenizer has one) by the trained model in ``path``, on ``device``; greedy unless ``temperature > 0``."""
    model, tokenizer = load_artifact(path, device=device)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    enc = enc.to(model_device(model))
    torch.manual_seed(seed)
    sample = temperature > 0
    output = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                            temperature=temperature if sample else None, top_p=None, top_k=None,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
