"""``qradaptor run``: profile → search → train → evaluate → export, each stage in its own sub-directory of
the run directory.

    DIR/stages.json                the run's settings and one record per stage: its input fingerprint, status,
                                   and the seconds it took (the attempt that finished it)
    DIR/profile/sensitivity.json   stage 1
    DIR/search/plan.json           stages 2-3 (+ pareto.json, pareto.png, study.db, and runs/: the chosen plan's
                                   fine-tune as the search left it, on the final fine-tune's schedule)
    DIR/train/                     the full fine-tune, continuing the search's run of the plan (resumed from its
                                   last checkpoint if interrupted)
    DIR/metrics.json               held-out (test split) loss and perplexity after training, and "before": the
                                   same quantized base with its adapters off
    DIR/model/                     the export (stock transformers + peft, or qradaptor.load)

Each stage records a fingerprint of its inputs in ``stages.json`` before it starts ("running") and marks it
"finished" when its output is written. On a rerun a stage is

- **kept** when its record is finished with the same fingerprint and its output is there and readable;
- **continued** when its fingerprint is the same but it had not finished (or its output was lost or damaged):
  rerunning the same command after a crash carries on (the search from its study, the fine-tune from its last
  checkpoint);
- **redone** from scratch when its inputs changed: the choice is to redo, not to refuse, because a changed
  setting is what the user asked for. Its old output is deleted first (the search must not resume a study made
  with other settings), and every stage downstream of a stage that runs again is redone too.

What each fingerprint covers: profile — model, data, profile settings; search — the profile, budget, alpha,
trials, search settings, model, data, and the final fine-tune's steps, batch size, learning rate and dtype (its
fidelities are that fine-tune's first steps, see `prefix_fidelities`); train — the plan (the search), steps,
training settings, budget, model, data; metrics and export — the training. Model identity is
`models.model_fingerprint` (the weights), data identity is `data.data_fingerprint` of the train, validation and
test splits (the contents, not the path).

The tool only deletes what it wrote: ``stages.json`` marks a directory as made by ``run``, a non-empty
``--out`` without it is refused, and a stage's output is deleted only while ``stages.json`` holds that stage's
record (a ``search/`` the user put there without one is refused, not deleted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from ..errors import ArtifactError
from ..evaluate import evaluate_loss
from ..io import LockHeld, atomic_write_json, exclusive_lock
from ..device import resolve_device
from ..models import LoadedModel
from ..precision import DTYPE_CHOICES, DTYPES, resolve_dtype

log = logging.getLogger("qradaptor")

STAGES_FILE = "stages.json"
_FORMAT = 1
# Stage → its output under the run directory, and the stages it reads. Dependents always come later.
_OUTPUTS = {"profile": "profile", "search": "search", "train": "train", "metrics": "metrics.json",
            "export": "model"}
_DEPENDS = {"profile": (), "search": ("profile",), "train": ("search",), "metrics": ("train",),
            "export": ("train",)}


def _downstream(stage: str) -> list[str]:
    """Every stage that reads ``stage``'s output, directly or not."""
    found: list[str] = []
    for other, deps in _DEPENDS.items():
        if any(d == stage or d in found for d in deps):
            found.append(other)
    return found


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class _Stages:
    """The run directory's ``stages.json``: the run's settings and a record per stage."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / STAGES_FILE
        self.records: dict[str, dict] = {}
        self.settings: dict = {}
        self._started: dict[str, float] = {}  # stages begun in this process → when
        if out.exists() and not out.is_dir():
            raise ArtifactError(f"--out {out} exists and is not a directory", "choose a directory path for --out")
        if self.path.is_file():
            try:
                obj = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(obj, dict) or obj.get("format") != _FORMAT or not isinstance(obj.get("stages"), dict):
                    raise ValueError("not a stage record of this qradaptor version")
            except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise ArtifactError(f"{self.path} is damaged ({e}), so it is unknown which files in {out} this "
                                    "run wrote", f"choose a new --out directory (or delete {out} if nothing in it "
                                    "is yours)") from None
            self.records = {k: v for k, v in obj["stages"].items() if isinstance(v, dict)}
        elif out.exists() and _not_empty(out):
            raise ArtifactError(f"{out} is not empty and was not made by `qradaptor run` (it has no {STAGES_FILE})",
                                "choose a new or empty --out directory")
        # A stage's output is deleted only while its record says this run wrote it: refuse one without.
        for stage, name in _OUTPUTS.items():
            output = out / name
            if stage not in self.records and (output.exists() or output.is_symlink()):
                raise ArtifactError(f"{output} exists but this run did not write it (no record of stage {stage!r} "
                                    f"in {self.path})", f"move {output} out of the run directory, or choose another "
                                    "--out")

    def save(self) -> None:
        try:
            atomic_write_json(self.path, {"format": _FORMAT, "tool": "qradaptor run", "settings": self.settings,
                                          "stages": self.records})
        except OSError as e:
            raise ArtifactError(f"cannot write {self.path}: {e.strerror or e}",
                                "choose an --out directory you can write to (or free disk space)") from None

    def fingerprint(self, stage: str, inputs: dict) -> str:
        deps = {d: self.records.get(d, {}).get("fingerprint") for d in _DEPENDS[stage]}
        payload = json.dumps({"stage": stage, "inputs": inputs, "after": deps}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _clear(self, stage: str) -> None:
        """Delete ``stage``'s output (ours: it has a record), then its record."""
        path = self.out / _OUTPUTS[stage]
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        self.records.pop(stage, None)

    def begin(self, stage: str, inputs: dict, output_ok) -> str:
        """``"keep"``, ``"continue"`` or ``"fresh"`` for ``stage`` (see the module docstring); for the last two
        its record is set to running and every downstream stage is cleared before this returns."""
        inputs = _jsonable(inputs)
        fp = self.fingerprint(stage, inputs)
        rec = self.records.get(stage)
        output = self.out / _OUTPUTS[stage]
        if rec is not None and rec.get("fingerprint") == fp:
            if rec.get("status") == "finished" and output_ok():
                return "keep"
            how = "continue"
            if rec.get("status") == "finished":
                log.warning("run: the output of stage %s (%s) is missing or damaged; making it again", stage, output)
        else:
            how = "fresh"
            if rec is not None:
                old = rec.get("inputs") or {}
                changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
                log.info("run: redoing %s (changed: %s)", stage,
                         ", ".join(changed) or "an earlier stage was redone")
                self._clear(stage)
        for later in _downstream(stage):
            if later in self.records:
                self._clear(later)
        self.records[stage] = {"fingerprint": fp, "status": "running", "inputs": inputs}
        self.save()
        self._started[stage] = time.perf_counter()
        return how

    def finish(self, stage: str) -> None:
        record = self.records[stage]
        record["status"] = "finished"
        if stage in self._started:  # wall time of the attempt that finished it (a continued one: its own part)
            record["seconds"] = round(time.perf_counter() - self._started.pop(stage), 3)
        self.save()

    def seconds(self) -> dict[str, float]:
        """Each finished stage's recorded seconds (by stage, in pipeline order)."""
        return {stage: self.records[stage]["seconds"] for stage in _OUTPUTS
                if "seconds" in self.records.get(stage, {})}


#: Fixes the train and export commands give, and what they mean inside `run` (which has no --resume or --to:
#: rerunning the same command continues, and its export goes to DIR/model).
_RUN_FIXES = (("rerun with --resume", "rerun the same `qradaptor run` command"),
              ("pass --resume to continue it", "rerun the same `qradaptor run` command to continue it"),
              ("qradaptor export RUN --to OUT", "the same `qradaptor run` command"),
              ("choose another --to directory", "choose another run --out directory"),
              ("choose a new or empty --to directory", "choose another run --out directory"))


def run_fix(fix: str | None) -> str | None:
    """A stage's fix text, reworded for `run`: name what `run` offers instead of the stage command's flags."""
    for theirs, ours in _RUN_FIXES:
        fix = fix.replace(theirs, ours) if fix else fix
    return fix


@contextlib.contextmanager
def _as_run_stage():
    from ..errors import QRAdaptorError

    try:
        yield
    except QRAdaptorError as e:
        fix = run_fix(e.fix)
        if fix == e.fix:
            raise
        raise type(e)(e.cause, fix) from None


def _not_empty(out: Path) -> bool:
    try:
        return any(not p.name.startswith(".qradaptor") for p in out.iterdir())  # our lock file is not content
    except OSError as e:
        raise ArtifactError(f"cannot read --out {out}: {e.strerror or e}",
                            "choose an --out directory you can read and write") from None


def _resolved(spec) -> str | None:
    """A model/data spec as recorded: existing paths absolute, anything else as given."""
    if spec is None:
        return None
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def _data_fingerprint(data, seq_len: int) -> str:
    """The data's contents: the train split (search, fine-tune), validation (fine-tune) and test (metrics)."""
    from ..data import data_fingerprint

    parts = [data_fingerprint(data, split, seq_len) for split in ("train", "validation", "test")]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def _profile_ok(path: Path, fingerprint: str) -> bool:
    from ..errors import QRAdaptorError
    from ..profile import Sensitivity

    try:
        return Sensitivity.load(path).model_fingerprint == fingerprint
    except QRAdaptorError:
        return False


def _plan_ok(search_dir: Path) -> bool:
    from ..errors import QRAdaptorError
    from ..plan import Plan

    try:
        Plan.load(search_dir / "plan.json")
    except QRAdaptorError:
        return False
    return (search_dir / "pareto.json").is_file()


def _read_json(path: Path) -> dict | None:
    """``path``'s JSON object, or None when it is missing or damaged."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


_METRIC_KEYS = ("test_loss_before", "test_loss_after", "test_perplexity_after", "test_tokens")


def read_metrics(path: Path) -> dict | None:
    """The held-out metrics (`held_out_metrics`) written at ``path``, or None when missing or damaged."""
    obj = _read_json(path)
    if obj is None or not all(isinstance(obj.get(k), (int, float)) for k in _METRIC_KEYS):
        return None
    return obj


def _train_status(train_dir: Path) -> str | None:
    """The training run's status, or None when there is none (or its run.json is damaged)."""
    from ..rundir import ADAPTER_DIR, read_run

    try:
        status = (read_run(train_dir) or {}).get("status")
    except ArtifactError:
        return None
    if status == "finished" and not (train_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return None
    return status


def held_out_metrics(model, tokenizer, *, data: str | None, seq_len: int, max_blocks: int | None,
                 progress: bool = True) -> dict:
    """Test-split loss of a trained PEFT ``model``, and of the same quantized base with its adapters off
    (``test_loss_before``: what the plan's quantization alone gives)."""
    from ..data import load_blocks

    blocks = load_blocks(data, tokenizer, "test", seq_len=seq_len, max_blocks=max_blocks, model=model)
    after = evaluate_loss(model, blocks, progress=progress, desc="test, trained")
    with model.disable_adapter():
        before = evaluate_loss(model, blocks, progress=progress, desc="test, untrained")
    return {"test_loss_before": before.loss, "test_loss_after": after.loss,
            "test_perplexity_after": after.perplexity, "test_tokens": after.tokens}


#: Locked (flock) while a `run` works in the directory: a second `run` there is refused instead of racing it.
LOCK_FILE = ".qradaptor-run"


def _one_run_per_directory(run_fn):
    @functools.wraps(run_fn)
    def locked(*args, out, **kwargs):
        out = Path(out)
        _Stages(out)  # refuses a file, a foreign directory or a damaged record before anything is written
        try:
            with exclusive_lock(out / LOCK_FILE, ArtifactError):
                return run_fn(*args, out=out, **kwargs)
        except LockHeld as e:
            raise ArtifactError(f"another `qradaptor run` is working in {out} (process {e.holder.get('pid', '?')} on "
                                f"{e.holder.get('host', '?')}, since {e.holder.get('started', '?')}); two would "
                                "overwrite each other's stages",
                                "wait for it to finish, or stop it and rerun this command to continue") from None

    return locked


@_one_run_per_directory
def run(model: "str | LoadedModel | None" = None, *, data: str | None = None, budget: str | int, out: str | Path,
        alpha: float = 0.5, trials: int = 8, steps: int = 200, profile_tokens: int | None = None,
        profile_dtype: str = "auto", seq_len: int = 256, eval_blocks: int | None = None,
        search_settings: dict | None = None, train_settings: dict | None = None, progress: bool = True,
        device: str | None = None, search_lr: float | None = None) -> dict:
    """What ``qradaptor run`` does. Returns the metrics written to ``out/metrics.json``. ``profile_tokens``:
    calibration tokens of the profile (None: 4096, or all the training split has if fewer).

    The model is loaded once, in the fine-tune's dtype (``train_settings["dtype"]``; ``auto``, the default: the
    dtype this device computes fast, `precision.default_dtype`, or the one a rerun's search recorded): the
    profile (``profile_dtype``; ``auto``: the fine-tune's) and the search read it (and quantize copies), the
    fine-tune then quantizes it in place, and the test loss and the export are taken from the trained model in
    memory. The search's fidelities are the first steps of the fine-tune's schedule (`prefix_fidelities`), and
    the fine-tune continues the chosen plan's run from where the search left it: the result is that of a fine-tune
    from step 0, with fewer steps trained. ``search_lr``: the peak rate of the search's fine-tunes (default: the
    fine-tune's, `search_rate`); where it differs from the fine-tune's, the search's runs are fine-tunes of their
    own and the fine-tune starts from step 0.
    ``model``: a spec, or a `LoadedModel` (its spec is what the run records); either is used up. ``device``
    (``auto``, ``cpu``, ``cuda``): where every stage computes; the dense model stays in host memory and each plan
    is quantized on the device. Not part of any stage's fingerprint: a run continues on another device."""
    from ..memory import parse_gguf_budget, parse_training_budget
    from ..models import load_base, model_fingerprint
    from ..plan import Plan
    from ..rundir import DEFAULT_START_TOKENS, RunConfig
    from ..search import search_rate

    out = Path(out)
    device = resolve_device(device)
    stages = _Stages(out)  # refuses a directory that `run` did not make, before any work
    # "auto" is no setting of its own: the fine-tune computes in the dtype resolved here
    train_settings = {k: v for k, v in (train_settings or {}).items()
                      if v is not None and (k, v) != ("dtype", "auto")}
    train_defaults = {**RunConfig().to_dict(), **train_settings}
    dtype = train_defaults["dtype"]
    if dtype == "auto":  # a rerun goes on in the dtype its search used; a new run in this device's fast dtype
        dtype = ((stages.records.get("search") or {}).get("inputs") or {}).get("dtype") or resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise ArtifactError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPE_CHOICES)}")
    profile_dtype = dtype if profile_dtype == "auto" else resolve_dtype(profile_dtype)
    log.info("run: computing in %s on %s", dtype, device)
    # in the fine-tune's dtype: the search's fine-tunes are then the final one's first steps, exactly
    base = load_base(model, dtype=DTYPES[dtype])
    # the search's fine-tunes start their adapters as the final one does (its beginning is one of them)
    search_settings = {**(search_settings or {}), "adapter_init": train_defaults["adapter_init"]}
    if train_defaults["start_tokens"] != DEFAULT_START_TOKENS:  # (the default left out: a run's record stays as it was)
        search_settings["start_tokens"] = train_defaults["start_tokens"]
    search_settings = Plan.check_settings(base.model, search_settings)  # refused before the profile
    if parse_gguf_budget(budget) is not None:  # a budget on files that cannot be written: refused before the profile
        from ..gguf_export import check_gguf_budget

        check_gguf_budget(base.spec, dora=bool(search_settings.get("dora")))
    rate = search_rate(train_defaults["lr"], search_lr)  # refused before the profile if it is no rate
    model_fp, data_fp = model_fingerprint(base.model), _data_fingerprint(data, seq_len)
    stages.settings = _jsonable({
        "model": _resolved(base.spec), "model_fingerprint": model_fp, "data": _resolved(data),
        "data_fingerprint": data_fp, "budget": budget, "alpha": alpha, "trials": trials, "steps": steps,
        "profile_tokens": profile_tokens, "profile_dtype": profile_dtype, "seq_len": seq_len,
        "eval_blocks": eval_blocks, "search_settings": search_settings or {}, "train_settings": train_settings,
        "dtype": dtype, **({"search_lr": search_lr} if search_lr is not None else {})})
    stages.save()
    job = _Run(out, stages, base, data, seq_len, device, dtype, progress,
               same={"model": model_fp, "data": data_fp, "seq_len": seq_len})
    # genes finer than a layer are priced by each linear's own estimate (`PriorCost.unit_bits_cost`)
    sensitivity = job.profile(tokens=profile_tokens, dtype=profile_dtype,
                              modules=search_settings.get("genes", "layer") != "layer")
    if rate != train_defaults["lr"]:
        log.info("run: the search ranks plans at lr %g, the fine-tune trains at %g: it starts from step 0, not "
                 "from the search's run", rate, train_defaults["lr"])
    # the search measures plans on the first steps of the final fine-tune's schedule (at the search's rate), and
    # keeps the chosen plan's run for the fine-tune to continue
    plan = job.search(sensitivity, budget=budget, alpha=alpha, trials=trials, settings=search_settings or {},
                      steps=steps, batch_size=train_defaults["batch_size"], lr=rate)
    # a budget on the training peak also binds the fine-tune (refused before it starts if it cannot fit)
    job.train(plan, steps=steps, budget=budget if parse_training_budget(budget) is not None else None,
              settings=train_settings, continue_search=rate == train_defaults["lr"])
    metrics = job.held_out(eval_blocks)
    # a budget on the GGUF files: the export writes them (what the budget was for)
    memory = job.export(gguf=parse_gguf_budget(budget) is not None)
    return {**metrics, "plan": str(plan), "model": str(out / "model"), "memory": memory,
            "stage_seconds": stages.seconds()}


@dataclasses.dataclass
class _Run:
    """One `run`'s stages over its loaded model: each begins with its record in ``stages.json`` (kept, continued or
    redone: see the module docstring) and finishes by marking it."""

    out: Path
    stages: _Stages
    base: LoadedModel  # used up by the fine-tune, which quantizes it in place
    data: str | None
    seq_len: int
    device: object
    dtype: str
    progress: bool
    same: dict  # what every stage's fingerprint holds: model, data, block length
    trained: object = None  # the TrainedModel, once the fine-tune made it or it was rebuilt from its run

    def profile(self, *, tokens: int | None, dtype: str, modules: bool = False) -> Path:
        from ..profile import ProfileSettings, profile_model

        sensitivity = self.out / "profile" / "sensitivity.json"
        given = {**self.same, "tokens": tokens, "dtype": dtype, **({"modules": True} if modules else {})}
        if self.stages.begin("profile", given,
                             lambda: _profile_ok(sensitivity, self.same["model"])) == "keep":
            log.info("run: profile done, using %s", sensitivity)
            return sensitivity
        log.info("run: stage 1/5, sensitivity profile")
        profile_model(self.base.model, self.base.tokenizer, ProfileSettings(
            tokens=tokens, seq_len=self.seq_len, dtype=dtype, data=self.data, modules=modules), out=self.out / "profile",
            force=True,
            progress=self.progress, device=self.device)
        self.stages.finish("profile")
        return sensitivity

    def search(self, sensitivity: Path, *, budget, alpha: float, trials: int, settings: dict, steps: int,
               batch_size: int, lr: float) -> Path:
        from .search import prefix_fidelities, search

        plan = self.out / "search" / "plan.json"
        searched = prefix_fidelities(settings, steps=steps, batch_size=batch_size, lr=lr)
        if self.stages.begin("search", {**self.same, "budget": budget, "alpha": alpha, "trials": trials,
                                        "settings": searched, "dtype": self.dtype},
                             lambda: _plan_ok(self.out / "search")) == "keep":
            log.info("run: search done, using %s", plan)
            return plan
        log.info("run: stage 2-3/5, budgeted search")
        search(self.base, data=self.data, budget=budget, out=self.out / "search", alpha=alpha, trials=trials,
               sensitivity=str(sensitivity), progress=self.progress, seq_len=self.seq_len, device=self.device,
               dtype=self.dtype, **searched)
        self.stages.finish("search")
        return plan

    def train(self, plan: Path, *, steps: int, budget, settings: dict, continue_search: bool = True) -> None:
        from ..export import TrainedModel
        from ..plan import Plan
        from ..rundir import read_run
        from ..search import kept_run
        from .train import KeptRunMismatch, train_plan

        train_dir = self.out / "train"
        how = self.stages.begin("train", {**self.same, "model_path": _resolved(self.base.spec), "steps": steps,
                                          "budget": budget, "settings": settings},
                                lambda: _train_status(train_dir) == "finished")
        if how == "keep":
            log.info("run: training done, using %s", train_dir)
            return
        status = _train_status(train_dir) if how == "continue" else None
        if status is None and train_dir.exists():
            shutil.rmtree(train_dir)  # ours, but holds no run it could resume (it died before run.json)
        if status != "finished":
            log.info("run: stage 4/5, fine-tune of the chosen plan%s", " (resuming)" if status else "")
            common = dict(plan=plan, model=self.base, data=self.data, progress=self.progress, budget=budget,
                          device=str(self.device))
            fresh = {"steps": steps, "seq_len": self.seq_len, **settings, "dtype": self.dtype}
            # its first steps are not trained twice (unless the search ranked plans at another rate)
            kept = None if status or not continue_search else kept_run(self.out / "search")
            with _as_run_stage():
                try:
                    result = train_plan(train_dir, **common, resume=bool(status),
                                        init_from=kept[0] if kept else None,
                                        **({"steps": None, "seq_len": None} if status else fresh))
                except KeptRunMismatch as e:  # refused before anything was written: train from step 0
                    log.warning("run: not continuing the search's run (%s); training from step 0", e.cause)
                    result = train_plan(train_dir, **common, **fresh)
            self.trained = TrainedModel(result.model, self.base.tokenizer, Plan.load(plan), read_run(train_dir))
        self.stages.finish("train")

    def trained_model(self):
        """The trained model: in memory from the fine-tune, else the finished run built on the loaded base."""
        from ..export import open_run

        if self.trained is None:
            with _as_run_stage():
                self.trained = open_run(self.out / "train", self.base, device=self.device)
        return self.trained

    def held_out(self, eval_blocks: int | None) -> dict:
        path = self.out / "metrics.json"
        if self.stages.begin("metrics", {**self.same, "eval_blocks": eval_blocks, "before": "adapters off"},
                             lambda: read_metrics(path) is not None) == "keep":
            return read_metrics(path)
        log.info("run: evaluating on the test split")
        tuned = self.trained_model()
        metrics = held_out_metrics(tuned.model, tuned.tokenizer, data=self.data, seq_len=self.seq_len,
                                   max_blocks=eval_blocks, progress=self.progress)
        atomic_write_json(path, metrics)
        self.stages.finish("metrics")
        return metrics

    def export(self, gguf: bool = False) -> dict | None:
        """The export's memory record (kept, or written now); with ``gguf`` llama.cpp's files too."""
        from ..export import EXPORT_FILE, PACKED_DIR
        from .export import export, export_manifest

        model_dir = self.out / "model"
        def written() -> bool:
            return export_manifest(model_dir) is not None and (not gguf or (model_dir / "model.gguf").is_file())

        if self.stages.begin("export", {"gguf": True} if gguf else {}, written) == "keep":
            log.info("run: export done, %s", model_dir)
            return (_read_json(model_dir / PACKED_DIR / EXPORT_FILE) or {}).get("memory")
        log.info("run: stage 5/5, export")
        with _as_run_stage():
            memory = export(self.out / "train", model_dir, gguf=gguf, trained=self.trained_model())["memory"]
        self.stages.finish("export")
        return memory
