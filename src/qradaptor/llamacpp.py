"""llama.cpp itself, through ``llama-cpp-python`` (its Python binding, built from the pinned release's vendored
llama.cpp): loads a GGUF model and a LoRA adapter and returns next-token logits, so an export is checked by the
runtime it is deployed with, not only by reading the file back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import QRAdaptorError

PACKAGE = "llama-cpp-python==0.3.36"


class LlamaCppError(QRAdaptorError):
    """llama.cpp is missing or refused a file."""


def _llama_class():
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LlamaCppError("llama.cpp's Python binding is not installed",
                            f"pip install {PACKAGE} (qradaptor's [llamacpp] extra; it builds llama.cpp from source)"
                            ) from None
    return Llama


class LlamaCpp:
    """A GGUF model in llama.cpp on the CPU, with ``adapter`` (a GGUF LoRA file) applied at scale 1."""

    def __init__(self, model: str | os.PathLike, adapter: str | os.PathLike | None = None, *, n_ctx: int = 512,
                 threads: int | None = None):
        Llama = _llama_class()
        for path in (model, adapter):
            if path is not None and not Path(path).is_file():
                raise LlamaCppError(f"{path} does not exist", "export the run with --gguf first")
        self.n_ctx = n_ctx
        try:
            self.llm = Llama(model_path=str(model), lora_path=None if adapter is None else str(adapter), n_ctx=n_ctx,
                             n_batch=n_ctx, logits_all=True, n_threads=threads or os.cpu_count(), verbose=False)
        except (ValueError, RuntimeError) as e:
            raise LlamaCppError(f"llama.cpp refused {model}" + (f" with the adapter {adapter}" if adapter else "")
                                + f": {e}", "export the model and its adapter again from the same run") from None
        self.vocab_size = self.llm.n_vocab()

    def logits(self, ids) -> np.ndarray:
        """Next-token logits ``(len(ids), vocab)`` (fp32) for one sequence, from an empty cache."""
        ids = [int(i) for i in ids]
        if not 0 < len(ids) <= self.n_ctx:
            raise LlamaCppError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}", "pass fewer tokens")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
