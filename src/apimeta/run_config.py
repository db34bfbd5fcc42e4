"""The typed configuration of a training run (``apimeta train``): one dataclass per component.

``RunConfig`` holds what every method reads (data, meta-model, episodes, the meta-update) and one
section per pipeline component (docs/design.md section 7)::

    recovery  RecoveryConfig   data recovery from one API (recover)
    zo        ZOConfig         the zero-order gradient estimator
    kd        KDConfig         bi-level KD: inner KD on S, boundary Q, outer KD
    events    EventConfig      when an API event happens
    memory    MemoryConfig     task memory replay
    http      HttpConfig       a zoo served over HTTP; the query cache
    eval      EvalConfig       meta-val selection and meta-test

Each method declares the sections it reads (``Method.reads``). A config is loaded from a preset
(``apimeta/presets/<name>.yaml``) and/or a user YAML, then overridden with ``--set key.sub=value``
(:func:`resolve_config`); the resolved config is written into every run directory. Keys of the
flat layout used before the sections existed (``recover_iters``, ``adv_start`` ...) are still read
and mapped to their new place (:data:`LEGACY_KEYS`), with a warning naming the new key.

Also here: :data:`ABLATIONS`, the config changes behind ``apimeta train --no-boundary`` etc. and
the ``bidf-mkd:<name>`` rows of ``apimeta bench``.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apimeta.config import from_dict, load_config, merge, parse_overrides, read_yaml, to_dict
from apimeta.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RecoveryConfig:
    """Data recovery from one API (docs/design.md 4.2): a generator trained through the API."""

    per_class: int = 10  # images recovered per class of the API (B = per_class x n_classes)
    iters: int = 50  # generator updates per recovery
    gen_lr: float = 1e-3
    nz: int = 256  # latent size
    ngf: int = 64  # generator width
    best_iterate: str = "true_loss"  # true_loss | surrogate | last (registry recovery.ITERATES)
    early_stop_prob: float | None = None  # stop once every target's API share exceeds this
    # torch.compile the generator (reused across recoveries, re-initialized in place); pays
    # only over many recoveries: see BENCHMARKS.md §5
    compile: bool = False
    # extension (0 = off, the paper): weight of a within-class diversity term, -(mean pairwise
    # 1 - cos of one class's images), added to the generator's loss; no queries
    diversity: float = 0.0
    diversity_space: str = "features"  # features (the learner's penultimate layer) | pixels
    # extension ("generator" = the paper): where the images an API labels come from; a
    # procedural source (apimeta.candidates.SOURCES, e.g. dead-leaves) draws ``candidates``
    # images per API event and queries each once, with no generator (bbkd only)
    source: str = "generator"
    candidates: int = 1000
    # the folder of unlabelled images that ``source: folder`` draws candidates from (any depth;
    # png/jpg; other sources ignore it, so one bench --set serves every row). NOT data-free: a
    # domain prior the user brings (public images), reported as its own setting
    folder: str | None = None
    # extension (0 = off, the paper: a fresh generator per recovery): a generator shared across
    # APIs (one per input spec; FREE, CVPR 2024, driven by the ZO estimator): each recovery
    # starts from it and, after recovery.iters steps, moves it by this Reptile step toward the
    # adapted weights, so a few iterations per API suffice
    meta_step: float = 0.0
    # extension (0 = off; bbkd only): after an event's two recoveries, this many mixups of random
    # pairs of its recovered images (candidates.mixups), each labelled by the API with one query
    # and added to the event's pool entry: cheap, more varied candidates near the recovered ones
    mixups: int = 0


@dataclass
class ZOConfig:
    """Zero-order gradient estimation (docs/design.md 4.3, 8.5)."""

    enabled: bool = True  # false: white-box recovery with true gradients (upper bound)
    estimator: str = "forward"  # forward | central | lowres (registry apimeta.zo.ESTIMATORS)
    directions: str = "sphere"  # sphere | gaussian
    mu: float = 0.005
    q: int = 10
    chunks: int = 1
    lowres: int = 8  # r for the lowres estimator (3*r*r dims)


def schedule_point(value: float, total: int) -> int:
    """A schedule value as a count: ``value`` in (0, 1) is that fraction of ``total`` (rounded,
    at least 1), so a schedule scales with the run's length; >= 1 (or 0) is an absolute count."""
    if 0 < value < 1:
        return max(1, round(value * total))
    return int(value)


@dataclass
class KDConfig:
    """Bi-level knowledge distillation from an API (docs/design.md 4.4-4.6)."""

    loss: str = "kl"  # kl | neg_prob_dot (registry apimeta.losses.KD_LOSSES)
    T: float = 1.0  # temperature
    inner_steps: int = 10  # inner-level KD steps on the support set S
    adv: float = 1.0  # lambda_adv of the boundary term of Q; 0 disables it
    # meta-updates before the boundary term switches on; a value in (0, 1) is that fraction of
    # the run's meta-updates (see schedule_point)
    adv_start: float = 500
    cache_api_outputs: bool = True  # query the API once per set, not once per inner step
    # extension (0 = off; bbkd only): weight of a SimCLR loss (NT-Xent, temperature
    # contrastive_tau) between two strongly augmented views of each KD batch's images, through
    # a 2-layer projection on the features; it teaches what stays the same under crops and
    # colour changes, and costs no queries
    contrastive: float = 0.0
    contrastive_tau: float = 0.2
    # extension ("nt-xent" = SimCLR's): the objective between the two views' projections;
    # "vicreg": VICReg's invariance + variance + covariance terms (no negatives; losses.vicreg),
    # and the temperature contrastive_tau is unused
    contrastive_loss: str = "nt-xent"
    # extension (needs contrastive > 0): the views also get the rest of SimCLR's colour
    # distortion (saturation, hue, grey with p 0.2; transforms.colour_distort), not only
    # brightness and contrast (grey images pass unchanged)
    contrastive_colour: bool = False
    # extension (0 = off; bbkd only, needs contrastive > 0): weight of a second NT-Xent on the
    # same views, on feature stage contrastive_low_stage's output (1 = the first stage) averaged
    # over space, through its own projection: the stages eval.reinit keeps get a loss of their own
    contrastive_low: float = 0.0
    contrastive_low_stage: int = 2
    # extension (0 = off; bbkd only): weight of a cross-entropy over the *whole* union head with
    # the API's top class as the label, on the images where the API's top probability exceeds
    # union_ce_min_prob; per-API KD only contrasts an API's own classes, this contrasts classes
    # of different APIs too (what MAML on the owners' data does). No queries
    union_ce: float = 0.0
    union_ce_min_prob: float = 0.0
    # extension ("all" = every API's classes): the union CE's classes. "dataset": only the
    # classes of the answering API's own dataset, so a multi-dataset zoo's union CE never
    # contrasts (say) emoji with kanji classes, which tells them apart by colour alone; the same
    # as "all" when the zoo has one dataset
    union_scope: str = "all"
    # extension (0 = off; bbkd only): the probability that an RGB image of an answered batch
    # reaches the student as its luma (grey) for the KD and union CE, the API's answer on the
    # colour image kept as the target; answers then teach shape more than colour (grey APIs'
    # images are unchanged). No queries
    grey: float = 0.0
    # bbkd only: weight of the per-API KD (each API distilled into its own union-head columns).
    # 0 with union_ce 0 uses none of the APIs' answers: the candidates are drawn as usual (as
    # many as query_budget would label) but never queried, a control for what the APIs add
    distill: float = 1.0
    # extension (empty = off; bbkd on a procedural source only): datasets or API names whose
    # APIs are never queried; their candidates are drawn as a labelled run draws them and teach
    # through kd.contrastive alone (the control, for those APIs only). Screened in API-MH with
    # the kanji APIs unanswered: kanji got worse (BENCHMARKS.md §6); choose it on meta-val
    unanswered: list[str] = field(default_factory=list)
    # extension (0 = off, a linear union head; bbkd only): the union head is a cosine classifier
    # (Baseline++: scale x cosine of the features and each class's weight vector, no bias) whose
    # scale starts at this value and is learned; the KD and union CE then shape the features'
    # directions, what nearest-centroid and the first fine-tuning step use at meta-test
    cosine_head: float = 0.0
    # extension (0 = off; bbkd only): manifold mixup of the KD (S2M2): each answered KD batch
    # also trains on mixes of its images with a permutation of them, at a depth drawn per batch
    # (the images or a feature stage's output, interpolation.draw_mix), the weight lam ~
    # Beta(this, this), against the same mix of the API's answers (probabilities); weighted
    # like the KD (kd.distill). No queries
    manifold_mixup: float = 0.0
    # extension (0 = off; bbkd only): later-layer forgetting. Every this many meta-updates (a
    # value in (0, 1) is that fraction of the run, see schedule_point) the top forget_stages
    # feature stages are re-drawn in place (each layer's default init, seeded by the step; their
    # Adam state cleared), as eval.reinit re-draws them at meta-test: the kept low-level stages
    # learn under ever-fresh top stages. No queries
    forget_every: float = 0.0
    forget_stages: int = 2
    # extension (0 = off; bbkd only): the top freeze_stages feature stages are drawn once at
    # setup and never trained (left out of the optimizer); the lower stages learn under them.
    # freeze_draw "eval": drawn exactly as eval.reinit = freeze_stages re-draws them at
    # meta-test, so training and meta-test see the same top stages (reinit 0 and reinit
    # freeze_stages then evaluate the same model); "run": drawn from the run's seed instead (the
    # control: frozen random stages that meta-test's re-draw replaces). No queries
    freeze_stages: int = 0
    freeze_draw: str = "eval"
    # extension (0 = off; bbkd only): born-again self-distillation. The run's updates are split
    # into 1 + born_again equal generations; each new generation starts from a fresh seeded
    # model, union head and projection (Adam state cleared), keeps the pool (no new queries) and
    # adds born_again_weight x KD (temperature born_again_T) from the last generation's union
    # logits over every API's classes, on the same batches
    born_again: int = 0
    born_again_weight: float = 1.0
    born_again_T: float = 4.0


UNION_SCOPES = ("all", "dataset")  # kd.union_scope
FREEZE_DRAWS = ("eval", "run")  # kd.freeze_draw


@dataclass
class EventConfig:
    """When an API event happens (docs/design.md 4.8)."""

    # plateau: after `patience` updates without a new training-accuracy max (the paper) |
    # every: every `patience` updates (bbkd's schedule; extension). Registry methods.bidf_mkd.TRIGGERS
    trigger: str = "plateau"
    patience: int = 25


@dataclass
class MemoryConfig:
    """Task memory replay (docs/design.md 4.7)."""

    enabled: bool = True
    mem_batches: int = 20  # FIFO capacity per class, in recovery batches
    quantize_uint8: bool = False
    # Extensions (off = the paper): also trigger API events while the memory holds fewer than
    # this many classes (early memory tasks otherwise replay one API's classes until plateau)
    min_classes: int = 0
    # store only query-set images the API assigns to their target class (boundary query sets
    # can drift to other classes; their KD targets are still the API's outputs either way)
    filter_query: bool = False
    # augment replayed memory tasks: comma-separated names from transforms.AUGMENTATIONS applied
    # in order to support and query images (crop, flip, jitter, cutout); "" = off (the paper)
    augment: str = ""
    # task interpolation (MLTI): the share of replayed memory tasks that are the mix of two memory
    # tasks (class k with class k, at a random depth, weight ~ Beta(alpha, alpha)); 0 = off
    interpolate: float = 0.0
    interpolate_alpha: float = 2.0


@dataclass
class HttpConfig:
    """Client settings for a zoo served over HTTP (``zoo: http://host:port``).

    ``api_key_file``: a file holding the server's API key (else ``$APIMETA_API_KEY``).
    ``max_retries``: re-sends of a failed request (connection errors, timeouts, 429, 502-504)
    with exponential backoff ``backoff * 2**k`` capped at ``max_backoff`` seconds; when they run
    out the run stops with ``last.pt`` and can be resumed. ``bill_retries``: count re-sent images
    against ``query_budget`` too (they are always recorded under ``ledger.retries``).
    ``query_cache``: an on-disk query cache (SQLite) so a resumed run does not pay again for
    queries answered before an interruption (and, after a SIGKILL, the ledger still counts
    every answer received); ``"auto"`` = ``<run dir>/query-cache.sqlite`` for any zoo,
    ``"http"`` (the default) = the same for a zoo served over HTTP and none for local zoos,
    ``"off"``/None = no cache, or a path.
    """

    api_key_file: str | None = None
    timeout: float = 30.0  # seconds per request
    max_retries: int = 5
    backoff: float = 0.5  # seconds
    max_backoff: float = 20.0
    concurrency: int = 1  # request chunks in flight at once
    bill_retries: bool = False
    query_cache: str | None = "http"  # path | "auto" | "http" | "off"


@dataclass
class EvalConfig:
    """Meta-validation (checkpoint selection) and meta-test (docs/design.md 6)."""

    every: float = 1000  # episodes between meta-val passes; in (0, 1): that fraction of the run
    tasks: int = 100  # meta-val tasks per pass
    test_tasks: int = 600  # meta-test tasks at the end of training
    test_shots: list[int] = field(default_factory=lambda: [1, 5])  # shots of that meta-test
    test_steps: int = 10  # fine-tuning steps at meta-val/meta-test
    test_lr: float | None = None  # fine-tuning lr at meta-val/meta-test (None: inner_lr, the paper)
    select_split: str = "val"  # val | test (the reference; optimistic)
    transductive: bool = True
    head: str = "learned"  # learned (paper) | zero | proto | random | ncc (evaluate.HEADS)
    reinit: int = 0  # re-draw the last N feature stages of the init before fine-tuning (0: none)
    # meta-test protocol chosen per shot on meta-val from this grid, e.g. {head: [learned, random]}
    # (keys lr, steps, head, reinit; {} or null: the fields above as they are). In-training
    # meta-val (checkpoint selection) uses the fields above.
    tune: dict[str, list[Any]] | None = field(default_factory=dict)


@dataclass
class RunConfig:
    """Everything a training run needs. The defaults are below; presets (``apimeta/presets``)
    override them."""

    method: str = "bidf-mkd"  # registry apimeta.methods.METHODS
    dataset: str = "emoji"  # comma-separated for API-MH (emoji,kanji)
    data_root: str | None = None
    # extra dataset loader options, e.g. {channels: 1} for grey folder images, {eval_only: true}
    data_options: dict[str, Any] = field(default_factory=dict)
    zoo: str | None = None  # zoo dir, ONNX dir or http(s)://host:port
    scenario: str = "auto"  # auto | SS | SH | MH
    api_output: str = "logits"  # output mode simulated by local/ONNX zoos (servers decide)
    seed: int = 2022
    device: str = "cpu"
    deterministic: bool = True  # deterministic CUDA kernels (exact resume); CPU: always
    threads: int | None = None

    # meta-model and episodes
    backbone: str = "conv4"
    width: float = 32
    image_size: int = 32
    way: int = 5
    shot: int = 1
    query: int = 15
    episodes: int = 8000
    meta_batch: int = 4
    outer_lr: float = 1e-3
    # extension (0 = off: Adam, the paper): decoupled weight decay of the outer optimizer
    # (AdamW: every update scales each weight by 1 - lr x this), on every trained parameter
    outer_wd: float = 0.0
    # extension (empty = off: one outer lr): a multiplier of the outer lr per feature stage,
    # from the input up (e.g. [2, 2] doubles it for the two lowest stages, those eval.reinit: 2
    # keeps); the stages not named, the heads and any method's extra parameters keep the outer lr
    outer_lr_stages: list[float] = field(default_factory=list)
    # extension (0 = off, the paper): an exponential moving average of the meta-model's weights,
    # w_ema <- ema * w_ema + (1 - ema) * w after every meta-update; meta-val, best.pt and the
    # meta-test use the average (last.pt keeps both, for an exact resume)
    ema: float = 0.0
    # extension ("constant" = the paper): "cosine" decays the outer lr from outer_lr to 0 over
    # the run's meta-updates (a function of the update index: resume needs no extra state)
    outer_lr_schedule: str = "constant"
    inner_steps: int = 5  # MAML inner steps on memory / real tasks
    inner_lr: float = 0.01  # every inner loop (MAML, inner KD, fine-tuning at meta-test)
    first_order: bool = False
    # extension ("learned" = the paper): how the head starts every training inner loop; zero or
    # random (fresh per inner loop) meta-learn only the features (apimeta.maml.TRAIN_HEADS)
    train_head: str = "learned"

    # query budget (images sent to APIs)
    query_budget: int | None = 5_000_000
    on_budget_exhausted: str = "replay"  # replay: keep training on memory | stop

    # components
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    events: EventConfig = field(default_factory=EventConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # bookkeeping
    checkpoint_every: int = 250  # meta-updates
    out: str | None = None  # run directory

    @property
    def dataset_names(self) -> list[str]:
        """``dataset`` split on commas (API-MH uses several)."""
        names = [d.strip() for d in self.dataset.split(",") if d.strip()]
        if not names:
            raise ConfigError("dataset is empty; give a dataset name, e.g. --dataset emoji")
        return names


#: config sections of RunConfig (what ``Method.reads`` names)
SECTIONS = ("recovery", "zo", "kd", "events", "memory", "http", "eval")

#: keys of the flat layout -> their place now (None: removed, the value is ignored if default)
LEGACY_KEYS: dict[str, str | None] = {
    "recover_per_class": "recovery.per_class",
    "recover_iters": "recovery.iters",
    "gen_lr": "recovery.gen_lr",
    "nz": "recovery.nz",
    "ngf": "recovery.ngf",
    "best_iterate": "recovery.best_iterate",
    "early_stop_prob": "recovery.early_stop_prob",
    "kd_loss": "kd.loss",
    "kd_T": "kd.T",
    "kd_inner_steps": "kd.inner_steps",
    "adv": "kd.adv",
    "adv_start": "kd.adv_start",
    "cache_api_outputs": "kd.cache_api_outputs",
    "api_patience": "events.patience",
    "event_trigger": "events.trigger",
    "eval_every": "eval.every",
    "eval_tasks": "eval.tasks",
    "test_tasks": "eval.test_tasks",
    "test_steps": "eval.test_steps",
    "select_split": "eval.select_split",
    "transductive": "eval.transductive",
    "zo.device": None,  # never read: directions are always drawn on the data's device
}
_REMOVED_DEFAULTS = {"zo.device": "data"}


def migrate_legacy(data: dict[str, Any], *, where: str = "config", quiet: bool = False) -> dict:
    """Move keys of the flat layout (:data:`LEGACY_KEYS`) to their section, in a copy of ``data``.

    A key given both ways is an error; a removed key is dropped if it holds its old default,
    else refused. ``quiet``: no warning (for files apimeta wrote itself, e.g. old run dirs).
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for old, new in LEGACY_KEYS.items():
        head, _, tail = old.partition(".")
        holder = out.get(head) if tail else out
        key = tail or head
        if not isinstance(holder, dict) or key not in holder:
            continue
        value = holder.pop(key)
        if new is None:
            if value != _REMOVED_DEFAULTS.get(old):
                raise ConfigError(
                    f"{where}: key {old!r} was removed (it was never read); delete it"
                )
            continue
        section, name = new.split(".")
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{where}: {section!r} must be a mapping")
        if name in target and target[name] != value:
            raise ConfigError(f"{where}: {old!r} and {new!r} both given; keep only {new!r}")
        target[name] = value
        if not quiet:
            log.warning("%s: key %r is now %r; please rename it", where, old, new)
    return out


def run_config_from_dict(data: dict[str, Any], *, where: str = "config", quiet: bool = False):
    """A :class:`RunConfig` from a mapping in the current or the flat (legacy) layout."""
    return from_dict(RunConfig, migrate_legacy(data, where=where, quiet=quiet))


# ----------------------------------------------------------------------------- presets


def available_presets() -> list[str]:
    """Names of the preset YAML files shipped in ``apimeta/presets``."""
    root = importlib.resources.files("apimeta") / "presets"
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The mapping in ``apimeta/presets/<name>.yaml``; ConfigError listing presets if absent."""
    res = importlib.resources.files("apimeta") / "presets" / f"{name}.yaml"
    if not res.is_file():
        have = ", ".join(available_presets()) or "(none installed)"
        raise ConfigError(f"no preset named {name!r}; available presets: {have}")
    data = yaml.safe_load(res.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name!r} must hold a YAML mapping")
    return migrate_legacy(data, where=f"preset {name}")


def _read_yaml(path: Path, quiet: bool) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    loaded = read_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a YAML mapping")
    return migrate_legacy(loaded, where=str(path), quiet=quiet)


def apply_sets(data: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``data`` with ``--set key.sub=value`` items merged in, one at a time (a later one wins), in
    either layout."""
    for item in sets:
        data = merge(data, migrate_legacy(parse_overrides([item]), where="--set"))
    return data


def split_variant(
    name: str, variants: Mapping[str, tuple[str, dict[str, Any]]] | None = None
) -> tuple[str, dict[str, Any]]:
    """``"bbkd:contrastive-leaves"`` -> ``("bbkd", ABLATIONS["contrastive-leaves"])``; a plain
    method name -> ``(name, {})``. ``variants``: the table of allowed ``METHOD:NAME`` rows
    (:func:`apimeta.bench.variants`, which knows what each method declares); without it any
    :data:`ABLATIONS` name is accepted."""
    if ":" not in name:
        return name, {}
    if variants is not None:
        if name not in variants:
            have = ", ".join(n for n in variants if ":" in n)
            raise ConfigError(f"unknown method variant {name!r}; choose from {have}")
        return variants[name]
    method, ablation = name.split(":", 1)
    if ablation not in ABLATIONS:
        raise ConfigError(
            f"unknown method variant {name!r}: no extension named {ablation!r} "
            f"(choose from {', '.join(ABLATIONS)})"
        )
    return method, ABLATIONS[ablation]


def resolve_config(**options: Any) -> RunConfig:
    """The resolved config of :func:`resolve_named` (same keyword options), without the
    requested method name."""
    return resolve_named(**options)[1]


def resolve_named(
    *,
    preset: str | None = None,
    config: Path | None = None,
    direct: dict[str, Any] | None = None,
    ablations: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    resume_from: Path | None = None,
    variants: Mapping[str, tuple[str, dict[str, Any]]] | None = None,
    expand: bool = True,
) -> tuple[str, RunConfig]:
    """(the method as requested, e.g. ``bbkd:contrastive-leaves``; the resolved RunConfig).
    RunConfig defaults <- preset <- --config file <- [method variant] <- direct options <-
    ablation flags <- --set (last wins). ``direct`` values of None mean "not given";
    ``ablations`` may set None.

    A method named ``METHOD:NAME`` (e.g. the ``cpu`` preset's ``bbkd:colour-leaves-ink-lr5``) is a
    variant: its config changes (:func:`split_variant`) enter just below the direct options, so
    ``--query-budget`` or ``--set`` still win and ``--method bidf-mkd`` drops them all; the
    resolved config names the plain method. ``expand=False`` keeps the name as it is (the shared
    base of ``apimeta bench``, whose rows name their own method).

    ``resume_from``: a run directory whose ``config.yaml`` replaces defaults/preset/file.
    """
    data = to_dict(RunConfig())
    if resume_from is not None:
        data = merge(data, _read_yaml(Path(resume_from) / "config.yaml", quiet=True))
    else:
        if preset:
            data = merge(data, load_preset(preset))
        if config is not None:
            data = merge(data, _read_yaml(Path(config), quiet=False))
    top: dict[str, Any] = {}
    if direct:
        top = merge(top, {k: v for k, v in direct.items() if v is not None})
    if ablations:
        top = merge(top, ablations)
    top = apply_sets(top, sets or ())
    named = str(top.get("method", data["method"]))
    if not expand:
        return named, from_dict(RunConfig, merge(data, top))
    method, changes = split_variant(named, variants)
    data = merge(merge(data, changes), top)
    data["method"] = method
    return named, from_dict(RunConfig, data)


def base_config(preset: str | None, sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A shared config as a plain dict: defaults <- preset <- --set overrides (validated). The
    method may be a variant name (``bbkd:contrastive-leaves``), not expanded: a comparison's rows
    name their own method (:func:`resolve_config`)."""
    return to_dict(resolve_config(preset=preset, sets=list(sets), expand=False))


def load_run_config(path: str | Path) -> RunConfig:
    """The ``config.yaml`` of a run directory (either layout)."""
    return load_config(RunConfig, path, migrate=lambda d: migrate_legacy(d, quiet=True))


# ----------------------------------------------------------------------------- ablations

#: config changes of the bidf-mkd ablations and extensions (``apimeta train --no-boundary`` etc.
#: and the ``bidf-mkd:<name>`` rows of ``apimeta bench`` use the same ones)
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-boundary": {"kd": {"adv": 0.0}},
    "no-memory": {"memory": {"enabled": False}},
    # NOT black-box: true gradients through the API's model. The early stop exists to save
    # queries, which cost nothing here, so recovery runs its full iters (an upper bound).
    "white-box": {"zo": {"enabled": False}, "recovery": {"early_stop_prob": None}},
    # default-off extensions (not the paper's method): API events until memory holds 10 classes,
    # and only query images the API itself assigns to their target class enter memory
    "diverse-memory": {"memory": {"min_classes": 10, "filter_query": True}},
    # extension: an API event every events.patience updates, bbkd's schedule, not on a plateau
    "scheduled": {"events": {"trigger": "every"}},
    # extension: replayed memory tasks are augmented (crop, flip, colour jitter, cutout)
    "augmented-memory": {"memory": {"augment": "crop,flip,jitter,cutout"}},
    # extension: a fifth of the cpu preset's recovery iterations (10 instead of 50), the control
    # of shared-generator (below) and the "fewer iterations" trade of queries for events
    "fast-recovery": {"recovery": {"iters": 10}},
    # extension (FREE-style): one generator shared across APIs, 10 recovery iterations per API
    # from it (a fifth of the cpu preset's 50) and a Reptile step of 0.25 after each recovery
    "shared-generator": {"recovery": {"meta_step": 0.25, "iters": 10}},
    # extension: half of the replayed memory tasks are interpolations of two (MLTI)
    "interpolated-memory": {"memory": {"interpolate": 0.5}},
    # extension: meta-val, best.pt and meta-test use a weight average (horizon ~20 updates)
    "ema": {"ema": 0.95},
    # extension: the outer lr decays from outer_lr to 0 over the run (cosine)
    "cosine-lr": {"outer_lr_schedule": "cosine"},
    # extensions: recovery also pushes one class's images apart, in the learner's feature
    # space or in pixels (weights from a one-recovery scale check, BENCHMARKS.md §6)
    "diverse-recovery": {"recovery": {"diversity": 1.0}},
    "diverse-pixels": {"recovery": {"diversity": 3.0, "diversity_space": "pixels"}},
    # extension: every inner loop (MAML, inner KD, fine-tuning) at lr 0.1, the fine-tuning lr
    # meta-val chooses for most inits (BENCHMARKS.md §6), so training and testing agree
    "large-inner-lr": {"inner_lr": 0.1},
    # extension: the head starts fresh (random) in every training inner loop and at meta-test,
    # so only the features are meta-learned and training and testing agree
    "random-head": {"train_head": "random", "eval": {"head": "random"}},
    # extension: bbkd on procedural dead-leaves images the APIs label with one query each (no
    # generator); an event every update while the budget lasts
    "dead-leaves": {"recovery": {"source": "dead-leaves"}, "events": {"patience": 1}},
    # extension: bbkd's generator recovery + 500 mixups of each event's recovered images, labelled
    # with one query each (about 1 % more queries per event at the cpu preset)
    "mixup-recovery": {"recovery": {"mixups": 500}},
    # extension, the `cpu` preset's method: dead-leaves + a contrastive loss on two views of
    # the same candidates; meta-val selects and meta-test adapts with the top two stages
    # re-drawn at lr 0.1, the protocol the screens chose in every seed and shot, with the head
    # (its own or a fresh one) chosen per shot on meta-val at the final meta-test, as in every
    # bench of it (meta-val chose either, by scenario and shot); 1,000 updates and 50 k queries,
    # meta-val at half and at the end: the run measured against random init and bidf-mkd over
    # 3 seeds (BENCHMARKS.md §6)
    "contrastive-leaves": {
        "episodes": 4000,
        "query_budget": 50_000,
        "recovery": {"source": "dead-leaves"},
        "events": {"patience": 1},
        "kd": {"contrastive": 1.0},
        "eval": {
            "reinit": 2,
            "test_lr": 0.1,
            "every": 0.5,
            "tune": {"head": ["learned", "random"]},
        },
    },
}
# extension: contrastive-leaves + a cross-entropy over the whole union head on the candidates an
# API is sure of (top probability > 0.8): classes of different APIs are told apart too
ABLATIONS["union-leaves"] = merge(
    ABLATIONS["contrastive-leaves"], {"kd": {"union_ce": 1.0, "union_ce_min_prob": 0.8}}
)
# extensions: union-leaves with other procedural candidates instead of dead leaves: glyph-like
# curved strokes, grey handwriting-like ink strokes, each candidate dead leaves or ink strokes
for _name, _source in {
    "union-strokes": "strokes",
    "union-ink": "ink-strokes",
    "union-leaves-ink": "leaves-ink",
}.items():
    ABLATIONS[_name] = merge(ABLATIONS["union-leaves"], {"recovery": {"source": _source}})
del _name, _source
# control for union-leaves-ink (not a learner from APIs): the same candidates and contrastive
# loss, no per-API KD and no union CE, so the APIs are never queried; the default minus this
# row is what the APIs' answers add (BENCHMARKS.md §6)
ABLATIONS["ssl-leaves-ink"] = merge(
    ABLATIONS["union-leaves-ink"], {"kd": {"distill": 0.0, "union_ce": 0.0}}
)
# extension: union-leaves-ink with the rest of SimCLR's colour distortion (saturation, hue,
# grey) on the contrastive views
ABLATIONS["colour-leaves-ink"] = merge(
    ABLATIONS["union-leaves-ink"], {"kd": {"contrastive_colour": True}}
)
# Adam's outer lr at 0.003 instead of the preset's 0.001 (BENCHMARKS.md §6): "lr3" for the
# methods that declare it (maml-real, so also the oracle maml-zoo:lr3, the measured ceiling);
# colour-leaves-ink-lr3 was the cpu preset's method before colour-leaves-ink-lr5
ABLATIONS["lr3"] = {"outer_lr": 0.003}
ABLATIONS["colour-leaves-ink-lr3"] = merge(ABLATIONS["colour-leaves-ink"], ABLATIONS["lr3"])
# Adam's outer lr at 0.005 (BENCHMARKS.md §6): "lr5" for the same methods; colour-leaves-ink-lr5
# is the cpu preset's method
ABLATIONS["lr5"] = {"outer_lr": 0.005}
ABLATIONS["colour-leaves-ink-lr5"] = merge(ABLATIONS["colour-leaves-ink"], ABLATIONS["lr5"])
# the default's outer lr pushed further, to 0.008 (a screen)
ABLATIONS["colour-leaves-ink-lr8"] = merge(ABLATIONS["colour-leaves-ink"], {"outer_lr": 0.008})
# extension: colour-leaves-ink-lr5 + a contrastive loss of weight 1 on stage 2's pooled output
# (the last stage eval.reinit: 2 keeps at meta-test)
ABLATIONS["low-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"], {"kd": {"contrastive_low": 1.0}}
)
# extension: colour-leaves-ink-lr5 followed by one born-again generation (kd.born_again): twice
# the updates, the first half exactly the default's run, the second a fresh model distilled from
# it and from the APIs' answers on the same pool (no more queries)
ABLATIONS["again-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"],
    {"episodes": 2 * ABLATIONS["colour-leaves-ink-lr5"]["episodes"], "kd": {"born_again": 1}},
)
# the control (no API answers) at the default's outer lr: colour-leaves-ink-lr5 minus this row
# is what the APIs' answers and the views' colour distortion add at lr 0.005
ABLATIONS["ssl-leaves-ink-lr5"] = merge(ABLATIONS["ssl-leaves-ink"], ABLATIONS["lr5"])
# extension: colour-leaves-ink-lr5 with a cosine union head (Baseline++), its scale starting at
# 10 and learned (kd.cosine_head)
ABLATIONS["cosine-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"], {"kd": {"cosine_head": 10.0}}
)
# extension: colour-leaves-ink-lr5 whose top two stages (those eval.reinit re-draws at
# meta-test) are re-drawn every tenth of the run
ABLATIONS["forget-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"], {"kd": {"forget_every": 0.1, "forget_stages": 2}}
)
# forget-leaves-ink-lr5's settings: only the top stage re-drawn (forget1), or the top two every
# fifth of the run (forget-slow) or every twentieth (forget-fast) instead of every tenth
ABLATIONS["forget1-leaves-ink-lr5"] = merge(
    ABLATIONS["forget-leaves-ink-lr5"], {"kd": {"forget_stages": 1}}
)
ABLATIONS["forget-slow-leaves-ink-lr5"] = merge(
    ABLATIONS["forget-leaves-ink-lr5"], {"kd": {"forget_every": 0.2}}
)
ABLATIONS["forget-fast-leaves-ink-lr5"] = merge(
    ABLATIONS["forget-leaves-ink-lr5"], {"kd": {"forget_every": 0.05}}
)
# extension: colour-leaves-ink-lr5 whose top two stages are drawn once, as eval.reinit=2
# re-draws them at meta-test, and never trained (freeze); the control freeze-run draws them from
# the run's seed instead
ABLATIONS["freeze-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"], {"kd": {"freeze_stages": 2, "freeze_draw": "eval"}}
)
ABLATIONS["freeze-run-leaves-ink-lr5"] = merge(
    ABLATIONS["freeze-leaves-ink-lr5"], {"kd": {"freeze_draw": "run"}}
)
# colour-leaves-ink-lr5 with the APIs' answers at twice the weight (per-API KD and union CE):
# under Adam the same as half the contrastive loss's weight
ABLATIONS["answers2-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"], {"kd": {"distill": 2.0, "union_ce": 2.0}}
)
# extension: colour-leaves-ink-lr5 with AdamW's decoupled weight decay 0.05 (outer_wd)
ABLATIONS["wd-leaves-ink-lr5"] = merge(ABLATIONS["colour-leaves-ink-lr5"], {"outer_wd": 0.05})
# extension: colour-leaves-ink-lr5 with manifold mixup of the KD, lam ~ Beta(2, 2)
ABLATIONS["mixup-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"], {"kd": {"manifold_mixup": 2.0}}
)
# extension: colour-leaves-ink-lr5 with VICReg's loss instead of NT-Xent on the same views
ABLATIONS["vicreg-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"], {"kd": {"contrastive_loss": "vicreg"}}
)
# the same at five times the weight (kd.contrastive: 5): VICReg's gradients are smaller than
# NT-Xent's at weight 1
ABLATIONS["vicreg5-leaves-ink-lr5"] = merge(
    ABLATIONS["vicreg-leaves-ink-lr5"], {"kd": {"contrastive": 5.0}}
)
# and at 25 times the weight: VICReg's own weights (25 : 25 : 1 for the three terms)
ABLATIONS["vicreg25-leaves-ink-lr5"] = merge(
    ABLATIONS["vicreg-leaves-ink-lr5"], {"kd": {"contrastive": 25.0}}
)
# extension: colour-leaves-ink-lr5 with twice the outer lr (0.01) for the two lowest stages, the
# ones eval.reinit: 2 keeps at meta-test (outer_lr_stages)
ABLATIONS["lowlr-leaves-ink-lr5"] = merge(
    ABLATIONS["colour-leaves-ink-lr5"], {"outer_lr_stages": [2.0, 2.0]}
)

# extensions, NOT data-free: contrastive-leaves / union-leaves with the candidates drawn from a
# folder of unlabelled images the user brings (--set recovery.folder=PATH), a domain prior
ABLATIONS["public-contrastive"] = merge(
    ABLATIONS["contrastive-leaves"], {"recovery": {"source": "folder"}}
)
ABLATIONS["public-union"] = merge(ABLATIONS["union-leaves"], {"recovery": {"source": "folder"}})


__all__ = [
    "ABLATIONS",
    "LEGACY_KEYS",
    "SECTIONS",
    "EvalConfig",
    "EventConfig",
    "HttpConfig",
    "KDConfig",
    "MemoryConfig",
    "RecoveryConfig",
    "RunConfig",
    "ZOConfig",
    "apply_sets",
    "available_presets",
    "base_config",
    "load_preset",
    "load_run_config",
    "migrate_legacy",
    "resolve_config",
    "resolve_named",
    "run_config_from_dict",
    "schedule_point",
    "split_variant",
]
