"""``qradaptor profile``: load the model, profile its per-layer sensitivity, write ``out/sensitivity.{json,png}``."""

from __future__ import annotations

from pathlib import Path

from ..device import resolve_device
from ..io import check_output_dir
from ..precision import DTYPES, resolve_dtype
from ..models import load_model
from ..profile import ProfileError, ProfileSettings, Sensitivity, profile_model


def profile(model: str | None = None, *, data: str | None = None, out: str | Path, bits=(2, 3, 4),
            tokens: int = 4096, backend: str = "hqq", dtype: str = "auto",
            group_size: int = 64, seq_len: int = 256, force: bool = False, use_cache: bool = True,
            progress: bool = True, device: str | None = None, modules: bool = False) -> Sensitivity:
    """What ``qradaptor profile`` does: load the model, profile it on ``device`` (``auto``, ``cpu``, ``cuda``),
    write ``out/sensitivity.{json,png}``. ``dtype``: the decoder layers' compute dtype during the probes (``auto``:
    the one `train` computes in on this device, `precision.default_dtype`). ``modules``: each linear's estimated
    KL too (`Sensitivity.module_kl`)."""
    device = resolve_device(device)
    settings = ProfileSettings(bits=tuple(bits), tokens=tokens, seq_len=seq_len, group_size=group_size,
                               backend=backend, dtype=resolve_dtype(dtype, device), data=data, modules=modules)
    check_output_dir(out, ProfileError)
    # in the dtype the probes compute in, as `search` and `train` load it: the profile is of that model (its
    # fingerprint), and a search in the same dtype finds it
    base, tokenizer = load_model(model, dtype=DTYPES[settings.dtype])
    return profile_model(base, tokenizer, settings, out=out, force=force, use_cache=use_cache, progress=progress,
                         device=device)
