"""One typed configuration for the whole system, loaded from YAML and validated up front.

Every field has a default: the defaults *are* the embedded tiny setup (local folders, SQLite,
the locally built base). A wrong value fails at load time with the field's dotted name and the
reason, before any model is built or any state is written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


BaseDtype = Literal["float32", "bfloat16"]  # what base.dtype may say
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]  # transformers' names (base.attn_implementation)


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML file must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelConfig(_Section):
    """The frozen vision-language base. `path=None` builds and pretrains the tiny default locally."""

    path: str | None = None  # local HF LLaVA checkpoint dir; None = the tiny base under home/base
    # How every stage loads the frozen base's weights. bfloat16 halves their memory (a 7 B base: 13 GiB
    # instead of 26, and under the GPU configs' autocast no bf16 copy of them either); the experts and
    # routers a task trains stay fp32 whatever this says (AdamW's master weights). fp32 on CPU (bf16
    # matmuls there are slow), and whenever answers must match a run made in fp32.
    dtype: BaseDtype = "float32"
    # The attention kernel of the base's text and vision models (transformers' attn_implementation):
    # "sdpa" (PyTorch's fused attention, no s x s matrix kept), "eager" (the reference matmuls) or
    # "flash_attention_2" (needs the flash-attn package, a CUDA GPU and base.dtype bfloat16).
    attn_implementation: AttnImplementation = "sdpa"
    seed: int = 0  # seeds base init, tokenizer training order and pretraining batches
    image_size: int = Field(64, gt=0)  # px; 64 is the smallest at which shapes are reliably learned (measured)
    patch_size: int = Field(16, gt=0)  # px; 16 gives 16 patches (+1 CLS) image tokens: 4x cheaper than 8 px
    vision_hidden: int = Field(96, ge=1)
    vision_layers: int = Field(3, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden: int = Field(128, ge=1)
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(4, ge=1)
    text_intermediate: int = Field(256, ge=1)  # dense MLP width; every upcycled expert has this width
    vocab_size: int = 512  # byte-level BPE: 256 byte tokens + merges + specials
    pretrain_samples: int = Field(8000, ge=1)  # synthetic captions / attribute notes in the pretraining corpus
    # Share of the corpus's images drawn by the domain-randomised renderer (cmoe.data.varied:
    # rotations, sizes, shades, backgrounds, clutter, fonts) instead of coin-mini's own, so that
    # the base learns shapes, counts and letters rather than one renderer (docs/method.md, 1c).
    varied_share: float = Field(0.5, ge=0.0, le=1.0)
    pretrain_epochs: int = Field(12, ge=0)
    pretrain_lr: float = Field(1e-3, gt=0.0)  # 2e-3 and 3e-3 plateau: colour naming stays at chance (measured)
    pretrain_batch_size: int = Field(64, ge=1)  # per-step overhead dominates at this size: bigger batches are cheaper
    # The MoE stage after pretraining: epochs over the same corpus training the upcycled experts and
    # a base router (the rest frozen), so the experts differ; 0 = a dense base (experts stay copies).
    moe_epochs: int = Field(2, ge=0)
    moe_lr: float = Field(1e-3, gt=0.0)

    @model_validator(mode="after")
    def _flash_in_bf16(self) -> BaseModelConfig:
        if self.attn_implementation == "flash_attention_2" and self.dtype == "float32":
            # flash-attn has no fp32 kernel, and evaluation decodes without autocast
            raise ValueError("attn_implementation flash_attention_2 computes in bf16 only: set dtype: bfloat16")
        return self

    @model_validator(mode="after")
    def _shapes_fit(self) -> BaseModelConfig:
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size={self.patch_size} exceeds image_size={self.image_size}")
        for hidden, heads in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads")):
            if getattr(self, hidden) % getattr(self, heads):
                raise ValueError(f"{hidden}={getattr(self, hidden)} is not divisible by {heads}={getattr(self, heads)}")
        return self


class MoEConfig(_Section):
    """Where the dense MLPs become CMoE layers and how tokens are routed (MoE-LLaVA defaults)."""

    # "all": every decoder layer is a CMoE layer, so *where* to grow is a choice among 4 on the tiny
    # base (MoE-LLaVA's every_other gives 2); the MoE stage trains them all (docs/method.md, 1).
    layers: Literal["every_other", "all"] | list[int] = "all"
    initial_experts: int = Field(4, ge=1)  # E0 copies of the dense MLP ("upcycling")
    top_k: int = Field(2, ge=1)
    aux_loss_coef: float = Field(0.01, ge=0.0)  # load-balancing loss weight
    # Bounded growth: a CMoE layer holds at most this many experts (E0 included); a full layer is
    # compacted (`compact:`) before it grows, and grows only into the room that frees. None = unbounded.
    max_experts_per_layer: int | None = Field(None, ge=1)

    @field_validator("top_k")
    @classmethod
    def _top_k_fits(cls, v: int, info) -> int:  # noqa: ANN001 - pydantic's ValidationInfo
        e0 = info.data.get("initial_experts", 4)
        if v > e0:
            raise ValueError(f"top_k={v} exceeds initial_experts={e0}")
        return v


class ProbeConfig(_Section):
    """PGKE: a short probe run that decides *when* a task must grow, and in which layers its experts go."""

    # When: the new task's router first trains alone over the existing experts for `router_steps`
    # (what the pool can do), then for `steps` more with its own delta in every CMoE layer (at
    # expand.delta_lr; expand.growth "delta") or with a probe expert in every CMoE layer ("experts"). The
    # task grows if the probes raise the held-out accuracy by `min_gain` points or more, or lower
    # its held-out answer loss by `min_loss_drop` nats per token or more (a hard task learns its
    # answers' loss before their argmax); otherwise it gets its router and locator VAE, and no
    # expert. min_gain -100 (with serves_at above 100) = always grow.
    router_steps: int = Field(10, ge=1)
    min_gain: float = Field(5.0, ge=-100.0, le=100.0)
    # 0.15 nats lies between what the probes add to a known task (0.011 on coin-mini's hue-name, 0.103
    # on the tiny suite's re-worded colour task) and to a new skill (0.23-0.27 on count-color, >= 1.9
    # on every other coin-mini task); 0.5 left count-color without experts (docs/method.md, 3).
    min_loss_drop: float = Field(0.15, ge=0.0)
    # ...unless the router alone already answers `serves_at` % of the held-out rows or more: then the
    # lineage serves the task, whatever the probes add. Measured on coin-mini: the known task hue-name's
    # pool answered 95-100 % (in one seed the probes then added exactly min_gain, 6 rows, and it grew),
    # every new task's 0-42 % (docs/method.md, 3). Above 100 = off.
    serves_at: float = Field(90.0, ge=0.0)
    steps: int = Field(20, ge=1)  # optimizer steps of probe training (after the router-only steps)
    lr: float = Field(1e-3, gt=0.0)  # 2e-3+ destabilises this tiny model (measured on the base)
    # 16 would halve the probe's cost, but the router-only phase then sees half the rows and the
    # known task (hue-name) grew two experts (docs/method.md, 6).
    batch_size: int = Field(32, ge=1)
    holdout_fraction: float = Field(0.1, gt=0.0, lt=0.5)  # of the task's *training* split
    tau: float | None = Field(None, ge=0.0)  # fixed threshold; None = uniform share k / (E_l + 1)
    tau_scale: float = Field(1.0, gt=0.0)  # multiplies tau (for sweeps)
    # Where, bounded: at most this share of the CMoE layers grows per task (rounded down, at least
    # one), the highest-scoring first, so a task adds at most half of naive expansion's experts (its
    # router and locator VAE come on top on both sides: 54 % of naive's parameters on the default base).
    max_layer_share: float = Field(0.5, gt=0.0, le=1.0)
    # ... and a task that grows takes at least this share (rounded down, at least one): when fewer
    # layers reach tau, the next-highest scores fill up. One layer instead of two cost coin-mini's
    # read-letter 8 points (45.5 against 53.5 %, docs/method.md, 4); 0 = only the layers at tau (and
    # the best one). max_layer_share caps it: a smaller max alone lowers both.
    min_layer_share: float = Field(0.5, ge=0.0, le=1.0)
    # score >= ratio * tau adds 2 experts instead of 1; None = always 1. Off by default: on
    # coin-mini's tiny base most scores pass 2 * tau once the pool has grown (tau falls as experts
    # are added), and doubling then added more parameters than naive expansion (docs/method.md).
    double_expert_ratio: float | None = Field(None, gt=0.0)


class CompactConfig(_Section):
    """Bounded growth (`cmoe compact`, and a full layer before it grows): which task experts go or merge.

    Measured on the kept evaluation sets, each task's router on its own set (docs/method.md,
    "Bounded growth"); upcycled base experts are never changed.
    """

    # A task expert whose share of top-k picks is at most this under every router that covers it is retired.
    min_use: float = Field(0.01, ge=0.0, le=1.0)
    # Two task experts whose outputs on the layer's inputs have a mean per-token cosine >= this merge.
    merge_similarity: float = Field(0.99, ge=-1.0, le=1.0)
    # A step is kept only if no task's accuracy falls more than this many points below its accuracy
    # before the compaction (locator routing, as the gate measures it).
    max_drop: float = Field(1.0, ge=0.0, le=100.0)


class TuneConfig(_Section):
    """`cmoe tune`: the `probe.tau_scale` values swept on a pilot sequence, and which point is chosen.

    Each value learns the pilot bundles as a throwaway lineage; the chosen point is the one that
    adds the fewest parameters among those whose Avg is within `max_avg_drop` of the best
    (docs/method.md, "Tuning tau on pilot data"). The locator temperature is not swept: the
    locator routes by argmin, so it changes neither routing nor Avg.
    """

    tau_scales: list[float] = [0.5, 1.0, 2.0]  # multiples of the probe's tau; below 1 grows more, above 1 less
    max_avg_drop: float = Field(1.0, ge=0.0, le=100.0)  # Avg points a chosen point may lie below the best

    @field_validator("tau_scales")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one tau_scale")
        bad = [x for x in v if not (x > 0 and math.isfinite(x))]
        if bad:
            raise ValueError(f"every tau_scale must be a finite number > 0, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"tau_scales {v} repeat a value")
        return v


class ExpandConfig(_Section):
    """Training of the task's growth (a delta or new experts) and its router (DeepSpeed)."""

    # ~300 steps per coin-mini task. 16 lifted cmoe's Avg 1.6 points on coin-mini (new experts) and
    # joint's 1.7, for twice the time (docs/method.md, 7).
    epochs: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(32, ge=1)
    # What a task that grows adds (docs/method.md, 5b). "delta": in every CMoE layer, a rank-`delta_rank`
    # change W + BA of every base expert, applied to that task's tokens only, inherited by the tasks
    # started from it, and trained (its probe phase too) with the task's router at `delta_lr`: on
    # read-letter, at the parameters of two experts, 1e-3 gave 59.5 %, 2e-3 to 5e-3 69.5-68.5 %, 1e-2
    # diverged; two new experts 50.5 %. "experts": the paper's new experts in the layers the probe
    # picks, warm-started from the probe experts, trained at `lr` (3e-3 lost 3 points).
    growth: Literal["delta", "experts"] = "delta"
    delta_rank: int = Field(8, ge=1)
    delta_lr: float = Field(3e-3, gt=0.0)
    # A JSON path, a file name in infra/deepspeed/, or "zeroN": the CPU fp32 or GPU bf16 variant by device.
    deepspeed_config: str = "zero0"
    checkpoint_every: int = Field(50, ge=1)  # steps between resume checkpoints
    # Gradient checkpointing of the text decoder in the probe's and the expansion's training: each
    # layer keeps only its input for the backward and recomputes the rest, so activation memory
    # falls from all layers' to about one layer's (`cmoe plan-resources` shows both) for ~1/3 more
    # compute. The same loss and gradients either way; turn it on when the activations of the
    # micro-batch do not fit (real-size bases), leave it off when they do.
    gradient_checkpointing: bool = False
    # Steps between the points of the training curve (loss, lr, samples/s) the probe and the
    # expansion log to their MLflow runs (and the progress artifact moves): one MLflow call each.
    log_every: int = Field(10, ge=1)
    seed: int = 0
    # Processes per machine for the expansion (one per GPU; CPU ranks use gloo). 1 = in-process;
    # >1 runs `torchrun -m cmoe.stages.expand_main` (see cmoe.stages.launch and docs/deploy.md).
    nproc_per_node: int = Field(1, ge=1)
    # DeepSpeed hostfile ("host slots=N" per line) for a multi-node expansion through the `deepspeed`
    # launcher; the home folder must then be on storage every host sees. None = this machine only.
    hostfile: str | None = None


class LocatorConfig(_Section):
    """PTL: one small VAE per task over a frozen pre-MoE feature."""

    latent_dim: int = Field(8, ge=1)
    hidden: int = Field(64, ge=1)
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    beta: float = Field(0.01, ge=0.0)  # KL weight (after warm-up)
    temperature: float = Field(1.0, gt=0.0)  # softmax(-z / T) over tasks
    # Text-token dropout: besides every training prompt as asked, each VAE fits `augment_copies`
    # copies whose text tokens are each left out of the text mean with probability `text_dropout`,
    # so that a re-worded question still lands near its task (docs/method.md, choice 9).
    text_dropout: float = Field(0.3, ge=0.0, lt=1.0)
    augment_copies: int = Field(7, ge=0)


class EvalConfig(_Section):
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(8, ge=1)


class GateConfig(_Section):
    """Automatic gate policy; thresholds in accuracy points (0-100)."""

    min_new_task_acc: float = Field(50.0, ge=0.0, le=100.0)
    max_forgetting: float = Field(5.0, ge=0.0, le=100.0)  # per old task, vs the champion's recorded accuracy
    # Per old task, vs its accuracy right after it was learned (the lineage's accuracy-matrix
    # diagonal): drops within `max_forgetting` per version must not add up without limit.
    max_forgetting_since_learned: float = Field(10.0, ge=0.0, le=100.0)
    max_avg_drop: float = Field(2.0, ge=0.0, le=100.0)
    max_params_added: int | None = None
    min_locator_acc: float = Field(90.0, ge=0.0, le=100.0)
    # An input is "unsure" when the locator's best task leads the second by less than this
    # probability margin; above `max_unsure_share` percent of the new task's evaluation inputs
    # unsure, a person reviews the candidate (and `cmoe predict` flags unsure answers).
    min_locator_margin: float = Field(0.1, ge=0.0, le=1.0)
    max_unsure_share: float = Field(20.0, ge=0.0, le=100.0)
    require_review: bool = False
    review_plan: bool = False  # pause after the probe to approve the expansion plan


class DataConfig(_Section):
    """What the lineage keeps of each task's data, and what it removes (docs/data-lifecycle.md)."""

    # Where each learned task's evaluation set is kept, content-addressed: a local folder or
    # s3://bucket/prefix/ (beside the registry's S3 artifacts). None = <home>/evalsets.
    eval_store: str | None = None
    # Rows of a task's test split kept as its evaluation set: None = all of them; N = a seeded
    # random subset of N rows (seed `eval_seed`), for test splits too large to re-run per version.
    eval_keep: int | None = Field(None, ge=1)
    eval_seed: int = 0
    # Local copies of a decided task's training data (the S3 download, the `datasets` Arrow cache)
    # are deleted once its version is decided; True keeps them (e.g. to debug a rejected task).
    keep_train_cache: bool = False
    # What the inbox watcher does with a bundle once its version is decided: leave it where the
    # user put it, move it into `<inbox>/.processed/`, or delete it. The inbox is the user's data:
    # nothing is deleted unless this says so.
    after_decision: Literal["keep", "move", "delete"] = "keep"


class RegistryConfig(_Section):
    """MLflow: where runs, metrics, artifacts and model versions are recorded."""

    tracking_uri: str | None = None  # None = sqlite:///<home>/mlflow.db
    artifact_location: str | None = None  # artifact root of a new experiment; None = <home>/mlartifacts
    model_name: str = "cmoe"  # registered model holding one version per candidate
    experiment: str = "cmoe"  # experiment holding one parent run per task arrival
    # Where people open the MLflow UI, for the links the Prefect runs carry to their MLflow run and
    # model version; None = the tracking URI when it is http(s), else http://127.0.0.1:5000 (the
    # `mlflow ui` that `cmoe demo` prints).
    ui_url: str | None = None
    # Seconds between system-metric samples (CPU, memory, disk, network; GPU where pynvml is
    # installed) logged on the expansion's run; None = none logged.
    system_metrics_s: float | None = Field(10.0, gt=0.0)
    # Every MLflow request (tracking, registry, artifacts through the server) waits at most
    # request_timeout_s to connect and for each read, and is retried request_retries times (a
    # refused or broken connection, a read timeout, a 429/5xx answer) after waits of 0, 4, 8 … s:
    # with these defaults a server that refuses connections fails a command in about 14 s, one that
    # never answers in under a minute (cmoe.registry.timeouts.worst_case_s). MLflow's own defaults
    # (7 retries, 120 s) hang it for minutes. Raise the timeout for large artifacts through a slow server.
    request_timeout_s: int = Field(10, ge=1)
    request_retries: int = Field(3, ge=0, le=10)  # MLflow refuses more than 10


class KpiConfig(_Section):
    """What the per-task KPIs assume (docs/orchestration.md): the price of a device-hour."""

    # Estimated cost = device-hours (each stage's wall time × the devices it held) × this rate.
    # The default is about an on-demand cloud GPU-hour; set what your devices cost.
    cost_per_device_hour: float = Field(2.0, ge=0.0)
    currency: str = "USD"


class FlowConfig(_Section):
    """Prefect orchestration: retries on transient I/O, and how a flow waits for a reviewer."""

    fetch_retries: int = Field(3, ge=0)  # extra tries of the bundle fetch on I/O errors (S3, network disks)
    retry_delay_s: float = Field(10.0, ge=0.0)  # seconds between those tries
    review_timeout_s: int = Field(7 * 24 * 3600, ge=1)  # an unanswered review fails the run (version stays pending)
    review_poll_s: int = Field(10, ge=1)  # how often a paused run checks for the reviewer's answer
    suspend_reviews: bool = False  # deployed runs only: suspend (frees the worker) instead of pausing
    # Prefect global concurrency limit (one slot) every run that builds on the champion holds, so two
    # candidates are never trained on one champion (flows/lineage_slot.py). Lineages (registered
    # models) that share one Prefect server need a name each.
    lineage_limit: str = Field("cmoe-lineage", pattern=r"^[A-Za-z0-9_.-]+$")


class CmoeConfig(_Section):
    """Root of the configuration tree."""

    home: Path = Path(".cmoe")  # all run-time state of the embedded default lives here
    inbox: str | None = None  # local folder or s3://bucket/prefix/; None = <home>/inbox
    base: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    moe: MoEConfig = MoEConfig()
    probe: ProbeConfig = ProbeConfig()
    expand: ExpandConfig = ExpandConfig()
    compact: CompactConfig = CompactConfig()
    tune: TuneConfig = TuneConfig()
    locator: LocatorConfig = LocatorConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    kpi: KpiConfig = KpiConfig()
    flow: FlowConfig = FlowConfig()


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and field."""


CONFIG_ENV = "CMOE_CONFIG"  # path of the YAML config used when none is given (deployed workers set it)


def load_config(path: str | Path | None = None, **overrides: object) -> CmoeConfig:
    """Read a YAML config (or $CMOE_CONFIG, or the defaults when both are unset), apply top-level overrides."""
    path, data = _read(path)
    data.update(overrides)
    return _validated(data, path)


def config_with(path: str | Path | None, changes: dict[str, object]) -> str:
    """The YAML text of the config `load_config(path)` reads, with each dotted field of `changes` (e.g.
    {"probe.tau_scale": 2.0}) set and every other line's value as the file has it; checked to load."""
    path, data = _read(path)
    for dotted, value in changes.items():
        *sections, name = dotted.split(".")
        node = data
        for section in sections:  # a section the file leaves out (or empty) starts as {}
            node[section] = node.get(section) or {}
            node = node[section]
        node[name] = value
    _validated(data, path)
    return yaml.safe_dump(data, sort_keys=False)


def _read(path: str | Path | None) -> tuple[str | Path | None, dict]:
    """The config file's path (`path`, else $CMOE_CONFIG, else None: the defaults) and its mapping."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None:
        return None, {}
    p = Path(path)
    if p.exists() and not (p.is_file() or p.is_dir()):  # a FIFO or device would block the read
        raise ConfigError(f"{p}: not a regular file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}): not a YAML config") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return path, data


def _validated(data: dict, path: str | Path | None) -> CmoeConfig:
    """`data` as a CmoeConfig; a ConfigError naming the file and each wrong field otherwise."""
    try:
        return CmoeConfig.model_validate(data)
    except ValidationError as e:
        where = str(path) if path is not None else "config"
        lines = [f"{where}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def tiny_test_config(home: str | Path, **overrides: object) -> CmoeConfig:
    """A configuration sized for seconds-long runs in tests: tiny base, few steps, tiny locator."""
    cfg = CmoeConfig.model_validate({
        "home": Path(home),
        "base": {"vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "text_hidden": 32,
                 "text_layers": 2, "text_heads": 2, "text_intermediate": 64, "image_size": 32,
                 "patch_size": 16, "vocab_size": 300, "pretrain_samples": 200, "pretrain_epochs": 1,
                 "pretrain_batch_size": 16, "moe_epochs": 1},
        "moe": {"layers": "all", "initial_experts": 2, "top_k": 1},
        # every layer whose share reaches tau grows, whatever the gain: tests of growth stay about growth
        "probe": {"router_steps": 2, "steps": 3, "batch_size": 16, "holdout_fraction": 0.25, "min_gain": -100.0,
                  "serves_at": 101.0, "max_layer_share": 1.0},
        "expand": {"epochs": 1, "batch_size": 16, "checkpoint_every": 2, "log_every": 1},
        "locator": {"epochs": 3, "hidden": 16, "latent_dim": 4},
        "eval": {"batch_size": 32, "max_new_tokens": 4},
        "gate": {"min_new_task_acc": 0.0, "min_locator_acc": 0.0, "max_forgetting": 100.0, "max_avg_drop": 100.0,
                 "max_forgetting_since_learned": 100.0, "max_unsure_share": 100.0},
        "registry": {"system_metrics_s": 0.5},  # a seconds-long expansion still logs a few samples
    })
    return cfg.model_copy(update=overrides)
