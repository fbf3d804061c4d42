"""The search's settings: the space, the budget, the fidelities, and its error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..architecture import DEFAULT_TARGET_MODULES
from ..errors import QRAdaptorError
from ..plan import DEFAULT_BIT_LADDER
from ..rundir import ADAPTER_INITS, DEFAULT_START_TOKENS
from .genes import GENE_LAYOUTS

DEFAULT_BITS = DEFAULT_BIT_LADDER  # (2, 3, 4, 5, 6, 8): exact packing makes 5 and 6 bits worth their bytes
DEFAULT_RANKS = (4, 8, 16, 32)
CONFIG_ATTR = "qradaptor_config"
#: What a budget bounds: the stored model (`memory.predict`), the predicted training peak (``train:``), or the
#: files llama.cpp runs (``gguf:``).
BUDGET_KINDS = ("stored", "training", "gguf")
FORMAT = "qradaptor-search-1"
#: Written into every --out a search uses: marks the directory as the tool's, and is locked (flock) for the
#: search's duration so that a second search on the same --out is refused instead of overwriting the first.
MARKER = ".qradaptor-search"
#: What a search writes into its --out (a directory that holds study.db but no marker is an older search's).
SEARCH_FILES = ("study.db", "pareto.json", "plan.json", "pareto.png", "search-summary.txt", "runs")


class SearchError(QRAdaptorError):
    """The search cannot run as asked."""


#: The prior's price of halving a layer's rank, in units of that layer's 4-bit KL (`planner.PriorCost`), by how the
#: search's fine-tunes start their adapters. From zero, a third (DESIGN §6). From a quantization-aware start the
#: fine-tune recovers far more of the quantization error, so bits buy less and rank more: priced as the fine-tune
#: traded them on SmolLM2 (halving every rank against every layer 4 → 3 bits; benchmarks/results/rank_value.md).
ZERO_START_RANK_VALUE = 1 / 3
STARTED_RANK_VALUE = 1.4


#: The bit-width whose quantization error the prior counts as recovered by a fine-tune from a quantization-aware
#: start (`SearchConfig.recovered_bits`): a layer's bits are charged only their KL above its KL at 4 bits, so widths
#: from 4 up cost nothing and a budget above 4 bits buys rank. With the price of rank above, on SmolLM2 it ends no
#: worse at every budget and ahead at 3.5 and 5 bits (benchmarks/results/rank_value-rb4.md). From zero: all of it.
STARTED_RECOVERED_BITS = 4


def default_rank_value(adapter_init: str) -> float:
    """The prior's price of rank (`SearchConfig.rank_value`) for fine-tunes whose adapters start as ``adapter_init``."""
    return ZERO_START_RANK_VALUE if adapter_init == "zero" else STARTED_RANK_VALUE


def default_recovered_bits(adapter_init: str) -> int:
    """The prior's `SearchConfig.recovered_bits` for fine-tunes whose adapters start as ``adapter_init`` (8: none)."""
    return 8 if adapter_init == "zero" else STARTED_RECOVERED_BITS


def search_rate(final_lr: float, given: float | None = None) -> float:
    """The peak learning rate of the search's fine-tunes for a final fine-tune at ``final_lr``: ``given``, else
    ``final_lr``, so that the search's runs are the final fine-tune's first steps (the chosen plan's is continued).
    At a final rate of 3e-3 that ranks plans best of the rates measured (Spearman 0.71 over seven plans, against
    -0.46 with the search at 1e-3, which picked the plan that ended last; benchmarks/results/search_lr.md)."""
    if given is not None:
        if not (isinstance(given, (int, float)) and given > 0 and given == given):
            raise SearchError(f"--search-lr must be a positive number, got {given!r}", "e.g. --search-lr 1e-3")
        return float(given)
    return float(final_lr)


# ---------------------------------------------------------------------------------------- config


@dataclass
class Fidelity:
    name: str
    steps: int
    eval_blocks: int
    batch_size: int = 4
    lr: float = 3e-4
    # 0: a fine-tune of ``steps`` steps (its own warm-up and decay); N: the first ``steps`` steps of an N-step one
    # (the final fine-tune's schedule), so the plan is measured where its final fine-tune would pass
    schedule_steps: int = 0


@dataclass
class SearchConfig:
    budget_bytes: int
    bits: tuple[int, ...] = DEFAULT_BITS
    ranks: tuple[int, ...] = DEFAULT_RANKS
    alpha: float = 0.5  # 1: only quality matters; 0: only memory
    # The defaults are the frontier benchmark's search, which costs under half the final fine-tune in steps
    # (benchmarks/results/frontier.md): within `run`'s 200 steps, 8 trials on the first 8 steps, the front's best
    # plan and the warm start's anchors continued to 16, one refinement plan of 16.
    trials: int = 8  # exploration trials (warm start included), cheap fidelity
    population: int = 4
    promote: int = 1  # cheap-front plans re-evaluated at the expensive fidelity, besides the warm start's anchors
    refine: int = 1  # Bayesian refinement iterations, expensive fidelity
    warm_start: int = 2  # prior-greedy plans at fractions of the budget (70% to 100%)
    cheap: Fidelity = field(default_factory=lambda: Fidelity("cheap", steps=8, eval_blocks=8))
    full: Fidelity = field(default_factory=lambda: Fidelity("full", steps=16, eval_blocks=16))
    seq_len: int = 256
    group_size: int = 64
    # group sizes to choose from per unit (a third gene), among those that divide all its linears' rows; empty: every
    # linear at ``group_size``
    group_sizes: tuple[int, ...] = ()
    # the linears of each decoder layer that get adapters (every plan's `Plan.target_modules`)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    dora: bool = False  # DoRA adapters in every plan (`Plan.dora`)
    expert_adapters: bool = False  # adapters on routed experts in every plan (`Plan.expert_adapters`)
    backend: str = "hqq"
    rank_value: float | None = None  # None: `default_rank_value` of ``adapter_init``
    # the bit-width whose quantization error the prior counts as recovered by the fine-tune from its start: a
    # layer's bits are charged only their KL above its KL at this width (8: all of it; planner.PriorCost). None:
    # `default_recovered_bits` of ``adapter_init``
    recovered_bits: int | None = None
    gradient_checkpointing: bool = True  # in the search's fine-tunes (see TrainConfig)
    adapter_init: str = "activation"  # how the search's fine-tunes start their adapters (RunConfig.adapter_init)
    start_tokens: int = DEFAULT_START_TOKENS  # the activation start's calibration tokens (RunConfig.start_tokens)
    # "stored": the budget is on the stored model (predict); "training": on the predicted training peak, i.e.
    # stored bytes + adapter gradients and AdamW state (12 bytes per trainable parameter) + training_fixed_bytes
    # (runtime, activations at the largest rank, loss: memory.training_memory for train_batch_size × seq_len).
    # "gguf": on the files `export --gguf` writes (gguf_export.layer_gguf_bytes per layer + gguf_fixed_bytes:
    # both files' headers and the tensors outside the decoder linears, as gguf_export.predict_gguf prices them).
    budget_on: str = "stored"
    training_fixed_bytes: int = 0
    gguf_fixed_bytes: int = 0
    train_batch_size: int = 4
    sampler: str = "nsga2"  # exploration sampler: "nsga2", or "random" (the baseline the benchmark compares to)
    # the unit each bits and rank gene chooses for (genes.py): a decoder layer, a block of one (attention, MLP), or
    # each linear
    genes: str = "layer"
    seed: int = 0

    def __post_init__(self) -> None:
        self.bits, self.ranks = tuple(sorted(self.bits)), tuple(sorted(self.ranks))
        self.group_sizes = tuple(sorted(set(self.group_sizes)))
        self.target_modules = tuple(self.target_modules)
        for key in ("cheap", "full"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, Fidelity(**value))
        if not 0 <= self.alpha <= 1:
            raise SearchError(f"--alpha must be between 0 and 1, got {self.alpha}", "0.5 weighs quality and memory equally")
        if self.budget_on not in BUDGET_KINDS:
            raise SearchError(f"unknown budget kind {self.budget_on!r}", f"use {', '.join(BUDGET_KINDS)}")
        if self.budget_on == "gguf" and self.dora:
            raise SearchError("a gguf: budget prices the files llama.cpp runs, and llama.cpp has no DoRA adapters",
                              "drop --dora, or give a budget on the stored model (4bit, 350MB)")
        if self.adapter_init not in ADAPTER_INITS:
            raise SearchError(f"unknown adapter start {self.adapter_init!r}",
                              f"use --adapter-init {' or '.join(ADAPTER_INITS)}")
        if self.rank_value is None:
            self.rank_value = default_rank_value(self.adapter_init)
        if not (isinstance(self.rank_value, (int, float)) and not isinstance(self.rank_value, bool)
                and self.rank_value > 0 and math.isfinite(self.rank_value)):
            raise SearchError(f"the prior's rank_value must be a positive number, got {self.rank_value!r}",
                              f"leave it out for the default ({default_rank_value(self.adapter_init):g} with the "
                              f"{self.adapter_init} start)")
        if self.recovered_bits is None:
            self.recovered_bits = default_recovered_bits(self.adapter_init)
        if type(self.recovered_bits) is not int or not 2 <= self.recovered_bits <= 8:
            raise SearchError(f"the prior's recovered_bits must be a bit-width from 2 to 8, got {self.recovered_bits!r}",
                              f"leave it out for the default ({default_recovered_bits(self.adapter_init)} with the "
                              f"{self.adapter_init} start; 8 charges a layer's whole KL)")
        if type(self.start_tokens) is not int or self.start_tokens <= 0:
            raise SearchError(f"--start-tokens must be a positive whole number, got {self.start_tokens!r}",
                              f"e.g. --start-tokens {DEFAULT_START_TOKENS} (the default)")
        if self.genes not in GENE_LAYOUTS:
            raise SearchError(f"unknown gene layout {self.genes!r}",
                              f"use --genes {', '.join(GENE_LAYOUTS)} (one choice per layer, per block, per linear)")
        if any(type(g) is not int or g <= 0 for g in self.group_sizes):
            raise SearchError(f"group sizes must be positive integers, got {list(self.group_sizes)}",
                              "e.g. --group-sizes 32,64,128")
        if self.group_sizes and self.group_size not in self.group_sizes:
            raise SearchError(f"the plans' group size {self.group_size} is not among --group-sizes "
                              f"{','.join(map(str, self.group_sizes))}",
                              f"add {self.group_size} to --group-sizes (it is what a linear no size fits keeps)")
        if self.sampler not in ("nsga2", "random"):
            raise SearchError(f"unknown sampler {self.sampler!r}", "use nsga2 or random")
        if self.trials < 1 or self.population < 2:
            raise SearchError("the search needs at least 1 trial and a population of 2", "e.g. --trials 8 --population 4")

    def plan_settings(self) -> dict:
        """What every plan of this search shares besides its layers (the `Plan` fields)."""
        return {"group_size": self.group_size, "target_modules": self.target_modules, "dora": self.dora,
                "expert_adapters": self.expert_adapters}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"], d["ranks"], d["target_modules"] = list(self.bits), list(self.ranks), list(self.target_modules)
        if not self.group_sizes:  # a study's record and fingerprint stay what they were before group sizes were genes
            del d["group_sizes"]
        else:
            d["group_sizes"] = list(self.group_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        # a study from before target modules were a setting adapted the default ones
        # and started its adapters at zero
        return cls(**{"adapter_init": "zero", **d, "bits": tuple(d["bits"]), "ranks": tuple(d["ranks"]),
                      "target_modules": tuple(d.get("target_modules") or DEFAULT_TARGET_MODULES),
                      "group_sizes": tuple(d.get("group_sizes") or ())})
