"""``bbkd``: black-box knowledge distillation of every API into one model, no meta-learning.

What a user would try first: recover data from the APIs (the same zero-order recovery and query
budget as ``bidf-mkd``), then train one network with a head over the *union* of all the APIs'
classes by KD — each API supervises only the logits of its own classes. For meta-test the
union head is dropped: the evaluated model is the distilled feature extractor with a zero-
initialized ``way``-output head, fine-tuned on each test task exactly like every other method.

Schedule: an API event every ``events.patience`` meta-updates (the first update included) while the
budget lasts; each meta-update trains on ``meta_batch`` batches drawn from the recovered pool.

``recovery.source`` other than ``generator`` (an extension, :mod:`apimeta.candidates`): an event
draws ``recovery.candidates`` procedural images (e.g. dead leaves) and queries each once; the
API's outputs are the KD targets, and no generator is trained. ``recovery.source: folder``
draws them from the user's folder of unlabelled images ``recovery.folder`` instead (NOT
data-free: a domain prior, reported as its own setting).

``recovery.mixups`` > 0 (an extension, generator source): after an event's two recoveries, that
many mixups of random pairs of its recovered images (:func:`~apimeta.candidates.mixups`) are
labelled by the API with one query each and join the event's pool entry.

``kd.contrastive`` > 0 (an extension): each KD batch's images also give two strong views
(:func:`~apimeta.transforms.resized_crop_flip`, then colour jitter; with
``kd.contrastive_colour`` also :func:`~apimeta.transforms.colour_distort`: saturation, hue and
grey), and a SimCLR loss (:func:`~apimeta.losses.nt_xent`) through a 2-layer projection of the
features is added with that weight (``kd.contrastive_loss: vicreg``: VICReg's loss,
:func:`~apimeta.losses.vicreg`, instead). No extra queries; the projection is dropped with the
union head.

``kd.union_ce`` > 0 (an extension): adds that weight x :func:`~apimeta.losses.union_ce`, a
cross-entropy over the *whole* union head with the API's top class as the label, on the images
where the API's top probability exceeds ``kd.union_ce_min_prob``. Per-API KD only contrasts an
API's own classes; this contrasts classes of different APIs as well. No extra queries.
``kd.union_scope: dataset`` keeps it to the classes of the answering API's dataset (a
multi-dataset zoo's emoji and kanji classes are never contrasted; one dataset: no change).

``kd.contrastive_low`` > 0 (an extension, needs ``kd.contrastive``): the same views' outputs of
feature stage ``kd.contrastive_low_stage`` (default 2, the last that ``eval.reinit: 2`` keeps),
averaged over space, get their own projection and NT-Xent with that weight: the stages
meta-test keeps learn from a contrastive loss of their own, not only through the stages above.

``kd.cosine_head`` > 0 (an extension): the union head is a :class:`CosineHead` (Baseline++),
its scale starting at that value and learned; the KD and union CE then act on the features'
directions, which nearest-centroid and the zero head's first fine-tuning step use at meta-test.

``kd.manifold_mixup`` > 0 (an extension, S2M2's manifold mixup): each answered KD batch also
trains on mixes of its images with a permutation of them, at a depth drawn per batch (the
images or one feature stage's output, :func:`~apimeta.interpolation.draw_mix`, lam ~ Beta(a,
a)), against the same mix of the API's answers as probabilities. No queries.

``kd.forget_every`` > 0 (an extension, later-layer forgetting): every that many meta-updates
(a fraction: of the run) the top ``kd.forget_stages`` feature stages are re-drawn in place
(:func:`~apimeta.models.stages.redraw_stages_`, seeded by the step) and their Adam state is
cleared, as ``eval.reinit`` re-draws them at meta-test. No queries.

``kd.freeze_stages`` > 0 (an extension): the top that many feature stages are drawn once, as
``eval.reinit`` re-draws them at meta-test (``kd.freeze_draw: eval``; ``run``: from the run's
seed, the control), and never trained: the lower stages learn under exactly the top stages
meta-test starts from. No queries.

``kd.born_again`` > 0 (an extension, born-again self-distillation as in RFS): the run's updates
are split into ``1 + kd.born_again`` equal generations. Each new generation starts from a fresh
seeded model, union head and projection (Adam state cleared), keeps the pool (no new queries)
and adds ``kd.born_again_weight`` x KD at temperature ``kd.born_again_T`` from the previous
generation's union logits over every API's classes (in eval mode) on the same batches: the
teacher relates the classes of different APIs, which per-API KD cannot.

``kd.distill`` weighs the per-API KD (default 1). ``kd.distill: 0`` with ``kd.union_ce: 0`` uses
none of the APIs' answers: a procedural source's candidates are drawn exactly as a labelled run
draws them (as many as ``query_budget`` would label, the same images) but never queried, and the
model learns from ``kd.contrastive`` alone — the control that says what the APIs' answers add.
``kd.unanswered`` (datasets or API names) makes that control for some APIs only: their
candidates are drawn but never queried and teach through ``kd.contrastive`` alone, while the
other APIs' answers train as usual; the budget counts their candidates as if labelled, so a run
draws the same number of candidates either way.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from apimeta.apis.base import BlackBoxAPI
from apimeta.candidates import FOLDER, draw_candidates, folder_images, mixups
from apimeta.episodes import APIEpisode
from apimeta.errors import ConfigError, QueryBudgetExceeded
from apimeta.evaluate import REINIT_SEED, head_features
from apimeta.events import APIEvent
from apimeta.interpolation import INPUT, draw_mix, mixing
from apimeta.losses import nt_xent, output_kind, teacher_probs, union_ce, vicreg
from apimeta.maml import named_params
from apimeta.methods.api_learner import APILearner
from apimeta.methods.interface import METHODS
from apimeta.models.meta import build_from_spec
from apimeta.models.stages import check_reinit, feature_stages, output_module, redraw_stages_
from apimeta.run_config import schedule_point
from apimeta.seeding import derive_seed
from apimeta.transforms import (
    color_jitter,
    colour_distort,
    crop_flip,
    random_grey,
    resize,
    resized_crop_flip,
    to_uint8,
)

log = logging.getLogger(__name__)


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer of a backbone built by ``build_backbone``."""
    head = getattr(getattr(model, "net", model), "classifier", None)
    if not isinstance(head, nn.Linear):
        raise TypeError("bbkd needs a backbone whose last layer is `net.classifier` (nn.Linear)")
    return head


def dataset_spans(keys: list[tuple[str, int]]) -> list[tuple[int, int]]:
    """Per union column, the [lo, hi) range of the columns of its dataset; ``keys`` are the
    union's sorted (dataset, class) pairs, so a dataset's columns are contiguous."""
    first: dict[str, int] = {}
    end: dict[str, int] = {}
    for i, (dataset, _) in enumerate(keys):
        first.setdefault(dataset, i)
        end[dataset] = i + 1
    return [(first[d], end[d]) for d, _ in keys]


PROJECTION_HIDDEN, PROJECTION_DIM = 256, 128  # SimCLR's projection MLP (kd.contrastive)


def _projection(width: int) -> nn.Module:
    """SimCLR's 2-layer projection MLP: (B, width) -> (B, PROJECTION_DIM)."""
    return nn.Sequential(
        nn.Linear(width, PROJECTION_HIDDEN), nn.ReLU(), nn.Linear(PROJECTION_HIDDEN, PROJECTION_DIM)
    )


class CosineHead(nn.Module):
    """A cosine classifier (Baseline++; ``kd.cosine_head``): (B, D) features -> (B, K) logits
    ``s * cos(f, w_k)``, no bias, the scale ``s`` learned (as its log) from ``scale``."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_features, out_features).weight.detach().clone())
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, feats: Tensor) -> Tensor:
        w = nn.functional.normalize(self.weight, dim=1)
        return self.log_scale.exp() * nn.functional.normalize(feats, dim=1) @ w.T


def _cpu_state(module: nn.Module | None) -> dict[str, Tensor] | None:
    return None if module is None else {k: v.detach().cpu() for k, v in module.state_dict().items()}


@METHODS.register("bbkd")
class BBKD(APILearner):
    """Black-box KD of all APIs into one union-head model (see the module docstring)."""

    name = "bbkd"
    ablations = (
        "dead-leaves", "contrastive-leaves", "union-leaves", "mixup-recovery",
        "union-strokes", "union-ink", "union-leaves-ink", "ssl-leaves-ink", "ssl-leaves-ink-lr5",
        "colour-leaves-ink", "colour-leaves-ink-lr3", "colour-leaves-ink-lr5",
        "cosine-leaves-ink-lr5", "mixup-leaves-ink-lr5", "forget-leaves-ink-lr5",
        "forget1-leaves-ink-lr5", "forget-slow-leaves-ink-lr5", "forget-fast-leaves-ink-lr5",
        "freeze-leaves-ink-lr5", "freeze-run-leaves-ink-lr5", "answers2-leaves-ink-lr5",
        "wd-leaves-ink-lr5", "colour-leaves-ink-lr8", "again-leaves-ink-lr5",
        "low-leaves-ink-lr5", "vicreg-leaves-ink-lr5", "vicreg5-leaves-ink-lr5",
        "vicreg25-leaves-ink-lr5", "lowlr-leaves-ink-lr5",
        "public-contrastive", "public-union",
    )  # fmt: skip
    reads = ("recovery", "zo", "kd", "events", "http", "eval")

    def setup(self) -> None:
        self.setup_apis()
        self.refuse_unaffordable(self.event_cost)
        if self.cfg.recovery.source == FOLDER:  # a bad folder fails now, not at the first event
            for spec in sorted({(a.info.image_size, a.info.channels) for a in self.apis}):
                n = len(folder_images(str(self.cfg.recovery.folder), *spec))
            log.warning(
                "recovery.source=folder: the APIs label %d images of %s; NOT data-free (a "
                "domain prior), report it as its own setting",
                n,
                self.cfg.recovery.folder,
            )
        kd = self.cfg.kd
        # the control without the APIs' answers: candidates drawn, never labelled
        self.uses_answers = bool(kd.distill or kd.union_ce)
        if not self.uses_answers:
            if self.cfg.recovery.source == "generator":
                raise ConfigError(
                    "kd.distill=0 with kd.union_ce=0 uses no API answers, and recovery.source "
                    "generator needs them; set a procedural recovery.source (e.g. leaves-ink)"
                )
            if not kd.contrastive:
                raise ConfigError(
                    "kd.distill=0, kd.union_ce=0 and kd.contrastive=0 leave nothing to learn; "
                    "turn one of them on"
                )
            log.warning(
                "kd.distill=0 and kd.union_ce=0: the APIs are never queried; the model learns "
                "from kd.contrastive on the candidates alone (a control, not a learner from APIs)"
            )
        self.unanswered = self._unanswered_apis()
        keys = sorted({(a.info.dataset, int(c)) for a in self.apis for c in a.info.classes})
        self.column = {k: i for i, k in enumerate(keys)}
        self.scope_of_column = dataset_spans(keys)  # kd.union_scope "dataset"
        head = classifier_of(self.model)
        # the evaluated model: distilled features + a zero head (uniform logits at meta-test)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
        # the zero head gets no gradient here (the loss uses the union head), so Adam skips it
        self.n_union = len(keys)
        # kd.contrastive_low: the stage whose pooled output gets its own NT-Xent, and its width
        self.low_stage: nn.Module | None = None
        self.low_width = 0
        if kd.contrastive_low:
            stage = self._stage(kd.contrastive_low_stage, "kd.contrastive_low_stage")
            self.low_stage = output_module(stage)  # (hooked: its output is the stage's)
            self.low_width = self._stage_width(self.low_stage)
        heads = self._heads(derive_seed(self.cfg.seed, self.name, "union-head"))
        self.union_head: nn.Module = heads["union_head"]  # type: ignore[assignment]
        self.projection = heads["projection"]
        self.low_projection = heads["low_projection"]
        extra = [p for m in heads.values() if m is not None for p in m.parameters()]
        self.optimizer.add_param_group({"params": extra})
        # recovered pool: per event (images in [0,1], API outputs on their augmented view)
        self.pool_x: list[Tensor] = []
        self.pool_t: list[Tensor] = []
        self.pool_cols: list[Tensor] = []
        self.pool_probs: list[bool] = []
        self.pool_answered: list[bool] = []  # False: drawn, never queried (no KD targets)
        self.budget_exhausted = False
        self.n_events = 0
        # kd.manifold_mixup draws a depth per KD batch among the backbone's stages: count once
        self.n_stages = len(feature_stages(self.model)) if kd.manifold_mixup else 0
        self.forget_every = 0
        if kd.forget_every:
            self._top_stages(kd.forget_stages, "kd.forget_stages")  # refused now, not mid-run
            self.forget_every = schedule_point(kd.forget_every, self.total_updates())
        self.frozen: list[nn.Parameter] = []
        if kd.freeze_stages:
            self._freeze(kd.freeze_stages)
        # kd.born_again: the updates of one generation, and the last generation (model, head)
        self.generation = 0
        self.teacher: tuple[nn.Module, nn.Module] | None = None
        if kd.born_again:
            self.generation = self.total_updates() // (1 + kd.born_again)
            if self.generation < 1:
                raise ConfigError(
                    f"kd.born_again={kd.born_again} splits the run's {self.total_updates()} "
                    f"meta-updates into {1 + kd.born_again} generations: raise --episodes or "
                    "lower kd.born_again"
                )

    def _heads(self, seed: int) -> dict[str, nn.Module | None]:
        """The trained modules beside the model, drawn from ``seed`` in this order (the global
        RNG, which differs per process, is left untouched): ``union_head`` over every API's
        classes; with ``kd.contrastive`` the contrastive loss's ``projection`` (SimCLR's
        2-layer MLP); with ``kd.contrastive_low`` the ``low_projection`` of the low stage."""
        kd, width = self.cfg.kd, classifier_of(self.model).in_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head: nn.Module = (
                CosineHead(width, self.n_union, kd.cosine_head)
                if kd.cosine_head
                else nn.Linear(width, self.n_union)
            ).to(self.device)
            projection = _projection(width).to(self.device) if kd.contrastive else None
            low = _projection(self.low_width).to(self.device) if kd.contrastive_low else None
        return {"union_head": head, "projection": projection, "low_projection": low}

    def _stage(self, k: int, key: str) -> nn.Module:
        """The model's feature stage ``k`` (1 = the first); ConfigError naming ``key``."""
        stages = feature_stages(self.model)
        if not 1 <= k <= len(stages):
            raise ConfigError(f"{key} must be in 1..{len(stages)} (the backbone's stages); got {k}")
        return stages[k - 1]

    def _stage_width(self, stage: nn.Module) -> int:
        """The channels of ``stage``'s output, from one forward pass of two blank images in eval
        mode (batch-norm statistics untouched)."""
        out: list[Tensor] = []
        handle = stage.register_forward_hook(lambda mod, args, y: out.append(y))
        training = self.model.training
        try:
            self.model.eval()
            size = self.cfg.image_size
            with torch.no_grad():
                self.model(
                    torch.zeros(2, int(self.spec["in_channels"]), size, size).to(self.device)
                )
        finally:
            handle.remove()
            self.model.train(training)
        return int(out[0].shape[1])

    def _frozen_copy(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` in eval mode with no gradients (a born-again teacher)."""
        out = copy.deepcopy(module).eval()
        for p in out.parameters():
            p.grad = None
            p.requires_grad_(False)
        return out

    def _next_generation(self, gen: int) -> None:
        """``kd.born_again``: the current model and union head become the teacher; the model,
        union head and projection are re-drawn in place (seeded by the generation; the zero
        head stays zero) and the Adam state is cleared. The pool is kept."""
        self.teacher = (self._frozen_copy(self.model), self._frozen_copy(self.union_head))
        seed = derive_seed(self.cfg.seed, self.name, "born-again", gen)
        fresh = build_from_spec(self.spec, seed=seed)
        with torch.no_grad():
            self.model.load_state_dict(fresh.state_dict())
            head = classifier_of(self.model)
            head.weight.zero_()
            head.bias.zero_()
        for name, module in self._heads(derive_seed(seed, "heads")).items():
            if module is not None:
                getattr(self, name).load_state_dict(module.state_dict())
        self.optimizer.state.clear()
        log.info("kd.born_again: generation %d starts at update %d", gen, self.step)

    def _teacher_logits(self, x: Tensor) -> Tensor:
        """(B, C, H, W) model inputs -> (B, union) logits of the born-again teacher."""
        assert self.teacher is not None
        model, head = self.teacher
        with torch.no_grad():
            return head(head_features(model, named_params(model), x))

    def _top_stages(self, k: int, key: str) -> list[nn.Module]:
        """The model's top ``k`` feature stages; ConfigError naming ``key`` when it has fewer."""
        try:
            stages = check_reinit(self.model, k)
        except ConfigError as e:
            raise ConfigError(str(e).replace("eval.reinit", key)) from None
        return stages[len(stages) - k :]

    def _freeze(self, k: int) -> None:
        """Draw the top ``k`` stages once (``kd.freeze_draw``: as ``eval.reinit = k`` re-draws
        them, or from the run's seed) and leave them out of the optimizer. They keep requiring
        grad, so meta-test fine-tunes them like any init's stages; their gradients are dropped
        each update (:meth:`meta_batch_loss`)."""
        top = self._top_stages(k, "kd.freeze_stages")
        draw = self.cfg.kd.freeze_draw
        seed = REINIT_SEED if draw == "eval" else derive_seed(self.cfg.seed, self.name, "freeze")
        redraw_stages_(top, seed)
        self.frozen = [p for stage in top for p in stage.parameters()]
        ids = {id(p) for p in self.frozen}
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        log.info("kd.freeze_stages: the top %d stages are frozen (%s draw)", k, draw)

    def _forget(self, step: int) -> None:
        """Re-draw the top ``kd.forget_stages`` stages in place and clear their Adam state."""
        top = self._top_stages(self.cfg.kd.forget_stages, "kd.forget_stages")
        redraw_stages_(top, derive_seed(self.cfg.seed, self.name, "forget", step))
        for stage in top:
            for p in stage.parameters():
                self.optimizer.state.pop(p, None)
        log.info("kd.forget_every: update %d re-drew the top %d stages", step, len(top))

    def extra_state(self) -> dict[str, Any]:
        return {
            **self.api_state(),
            "union_head": _cpu_state(self.union_head),
            "projection": _cpu_state(self.projection),
            "low_projection": _cpu_state(self.low_projection),
            "pool_x": list(self.pool_x),
            "pool_t": list(self.pool_t),
            "pool_cols": list(self.pool_cols),
            "pool_probs": list(self.pool_probs),
            "pool_answered": list(self.pool_answered),
            "budget_exhausted": self.budget_exhausted,
            "n_events": self.n_events,
            "teacher": None
            if self.teacher is None
            else {"model": _cpu_state(self.teacher[0]), "union_head": _cpu_state(self.teacher[1])},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.load_api_state(state)
        self.union_head.load_state_dict(state["union_head"])
        if self.projection is not None:  # a switched kd.contrastive fails at the optimizer
            self.projection.load_state_dict(state["projection"])
        if self.low_projection is not None:
            self.low_projection.load_state_dict(state["low_projection"])
        self.pool_x = list(state["pool_x"])
        self.pool_t = list(state["pool_t"])
        self.pool_cols = list(state["pool_cols"])
        self.pool_probs = [bool(b) for b in state["pool_probs"]]
        # checkpoints from before kd.unanswered: every entry answered as the run did
        answered = state.get("pool_answered", [self.uses_answers] * len(self.pool_x))
        self.pool_answered = [bool(b) for b in answered]
        self.budget_exhausted = bool(state["budget_exhausted"])
        self.n_events = int(state["n_events"])
        self.teacher = None
        teacher = state.get("teacher")  # checkpoints from before kd.born_again: none
        if teacher is not None:
            model, head = self._frozen_copy(self.model), self._frozen_copy(self.union_head)
            model.load_state_dict(teacher["model"])
            head.load_state_dict(teacher["union_head"])
            self.teacher = (model, head)

    def _unanswered_apis(self) -> frozenset[str]:
        """The names of the APIs ``kd.unanswered`` (datasets or API names) leaves unqueried."""
        cfg = self.cfg
        wanted = list(cfg.kd.unanswered)
        if not wanted:
            return frozenset()
        datasets = sorted({a.info.dataset for a in self.apis})
        known = set(datasets) | {a.info.name for a in self.apis}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ConfigError(
                f"kd.unanswered: {', '.join(unknown)} is neither a dataset nor an API of this "
                f"zoo; its datasets are {', '.join(datasets)} (or name APIs, e.g. "
                f"{self.apis[0].info.name})"
            )
        if cfg.recovery.source == "generator":
            raise ConfigError(
                "kd.unanswered needs a procedural recovery.source (e.g. leaves-ink): generator "
                "recovery needs every API's answers"
            )
        if not cfg.kd.contrastive:
            raise ConfigError(
                "kd.unanswered needs kd.contrastive > 0: the unanswered APIs' candidates teach "
                "through it alone"
            )
        names = frozenset(
            a.info.name for a in self.apis if a.info.name in wanted or a.info.dataset in wanted
        )
        log.info("kd.unanswered: %d of %d APIs are never queried", len(names), len(self.apis))
        return names

    def _answered(self, api: BlackBoxAPI) -> bool:
        """Whether this API's answers are used (it is queried) at its events."""
        return self.uses_answers and api.info.name not in self.unanswered

    def should_stop(self) -> bool:
        return self.budget_exhausted and self.cfg.on_budget_exhausted == "stop"

    def event_cost(self, api: BlackBoxAPI) -> int:
        """Worst-case queries of one event: two recoveries, each with its final query, and the
        mixups (a procedural source: one query per candidate)."""
        rc = self.cfg.recovery
        if rc.source != "generator":
            return rc.candidates
        return 2 * (self.recovery_cost(api) + rc.per_class * api.info.n_classes) + rc.mixups

    def _add_to_pool(self, api: BlackBoxAPI, x: Tensor, t: Tensor, answered: bool = True) -> None:
        cols = torch.tensor([self.column[(api.info.dataset, int(c))] for c in api.info.classes])
        self.pool_x.append(x.cpu())
        self.pool_t.append(t.cpu())
        self.pool_cols.append(cols)
        self.pool_probs.append(output_kind(api.info.output) != "logits")
        self.pool_answered.append(answered)
        self.n_events += 1

    def _candidate_event(self, api: BlackBoxAPI) -> None:
        """Label ``recovery.candidates`` procedural images of the API's input spec with one
        query each (the pool keeps them at that size; batches are resized for the model)."""
        cfg = self.cfg
        x8 = to_uint8(
            draw_candidates(
                cfg.recovery.source, cfg.recovery.candidates, api.info.image_size,
                api.info.channels, self.rng("candidates"), folder=cfg.recovery.folder,
            )
        )  # fmt: skip
        # the API sees exactly what the pool keeps: uint8 images (a quarter of float32's memory)
        x = x8.to(self.device).float() / 255.0
        answered = self._answered(api)
        if answered:
            try:
                t = api.query(x)
            except QueryBudgetExceeded:
                self.budget_exhausted = True
                return
            y = t.argmax(1)  # the grid of the event shows the candidates by the API's verdict
        else:  # the control: never queried; placeholder targets no loss reads, rows in turn
            t = torch.zeros(x.shape[0], api.info.n_classes, device=self.device)
            y = torch.arange(x.shape[0], device=self.device) % api.info.n_classes
        self._add_to_pool(api, x8, t, answered)
        episode = APIEpisode(
            api=api.info.name, dataset=api.info.dataset, classes=api.info.classes,
            support_x=x, support_y=y, query_x=x, query_y=y,
            query_keep=torch.ones_like(y, dtype=torch.bool),
        )  # fmt: skip
        record: dict[str, Any] = {
            "step": self.step + 1,
            "event": self.n_events - 1,
            "api": api.info.name,
            "source": cfg.recovery.source,
            "labelled": answered,
            "queries_total": self.ledger.used,
        }
        if answered:  # the API's mean top probability (how sure it is of what it sees)
            probs = teacher_probs(t, 1.0, self.pool_probs[-1])
            record["confidence"] = float(probs.max(1).values.mean())
        self.record_event(APIEvent(self.n_events - 1, episode, record))

    def _event(self) -> None:
        api: BlackBoxAPI = self.pool.draw()
        cost = self.event_cost(api)
        # unanswered candidates count as if labelled: as many are drawn as the budget would label
        pool = zip(self.pool_x, self.pool_answered, strict=True)
        unlabelled = sum(x.shape[0] for x, answered in pool if not answered)
        budget = self.ledger.budget
        if budget is not None and self.ledger.used + unlabelled + cost > budget:
            self.budget_exhausted = True
            return
        if self.cfg.recovery.source != "generator":
            self._candidate_event(api)
            return
        recs = []
        try:
            # two recoveries per event, like bidf-mkd's S and Q, so both spend the same queries;
            # teacher outputs: one query of the kept (un-augmented) images each
            for _ in range(2):
                rec = self.recover_from(api, final_query=True)
                if rec.budget_exhausted or rec.api_outputs is None:
                    self.budget_exhausted = True
                    return
                recs.append(rec)
        except QueryBudgetExceeded:
            self.budget_exhausted = True
            return
        images = torch.cat([r.images for r in recs])
        outputs = torch.cat([r.api_outputs for r in recs])  # type: ignore[misc]
        if self.cfg.recovery.mixups:
            xm, *_ = mixups(images, self.cfg.recovery.mixups, self.rng("mixups"))
            try:
                tm = api.query(xm)
            except QueryBudgetExceeded:  # the recovered images are paid for: keep them
                self.budget_exhausted = True
            else:
                images, outputs = torch.cat([images, xm]), torch.cat([outputs, tm])
        self._add_to_pool(api, images, outputs)
        first, second = recs
        episode = self.episode_of(api, first, second)
        record = {
            "step": self.step + 1,  # the meta-update it belongs to (dropped with it on resume)
            "event": self.n_events - 1,
            "api": api.info.name,
            "fidelity": second.fidelity,
            "queries_total": self.ledger.used,
        }
        self.record_event(APIEvent(self.n_events - 1, episode, record))

    def _features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) model inputs -> (B, D) features (the head's input), with gradients.
        The hook of :func:`head_features` lives for one forward pass: a hook left on the model,
        bound to the learner, would be copied with it (``eval.reinit`` deep-copies the model)."""
        return head_features(self.model, named_params(self.model), x)

    def _contrastive(self, x: Tensor, g: torch.Generator) -> Tensor:
        """``kd.contrastive`` x NT-Xent (``kd.contrastive_loss``) between two strong views of the
        (B, C, H, W) pool images ``x`` (uint8 or float in [0, 1]), one forward pass of both
        through the model and the projection; with ``kd.contrastive_low``, plus that weight x
        the same loss of the low stage's spatially pooled outputs (the same pass) through their
        own projection."""
        assert self.projection is not None
        kd = self.cfg.kd
        xf = (x.float() / 255.0 if x.dtype == torch.uint8 else x).to(self.device)
        views = [color_jitter(resized_crop_flip(xf, g), g) for _ in range(2)]
        if kd.contrastive_colour:
            views = [colour_distort(v, g) for v in views]
        low: list[Tensor] = []
        handle = None
        if self.low_stage is not None:
            handle = self.low_stage.register_forward_hook(lambda mod, args, y: low.append(y))
        try:
            feats = self._features(resize(torch.cat(views), self.cfg.image_size))
        finally:
            if handle is not None:
                handle.remove()
        z1, z2 = self.projection(feats).chunk(2)
        loss = kd.contrastive * self._views_loss(z1, z2)
        if self.low_projection is not None:
            l1, l2 = self.low_projection(low[-1].mean((2, 3))).chunk(2)
            loss = loss + kd.contrastive_low * self._views_loss(l1, l2)
        return loss

    def _views_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        """``kd.contrastive_loss`` between two views' (B, D) projections."""
        if self.cfg.kd.contrastive_loss == "vicreg":
            return vicreg(z1, z2)
        return nt_xent(z1, z2, self.cfg.kd.contrastive_tau)

    def _mixup_kd(
        self, xb: Tensor, teacher: Tensor, cols: Tensor, is_probs: bool, g: torch.Generator
    ) -> Tensor:
        """KD on manifold mixes of the (B, C, H, W) batch ``xb`` (model size) with a permutation
        of it, against the same mix of the (B, K) answers ``teacher`` (``kd.manifold_mixup``)."""
        cfg = self.cfg
        mix = draw_mix(self.n_stages, cfg.kd.manifold_mixup, g)
        perm = torch.randperm(xb.shape[0], generator=g).to(self.device)
        p = teacher_probs(teacher, 1.0, is_probs)  # mixed as probabilities, tempered by the KD
        target = mix.lam * p + (1 - mix.lam) * p[perm]
        if mix.stage == INPUT:
            feats = self._features(mix.lam * xb + (1 - mix.lam) * xb[perm])
        else:  # both halves become the mix after that stage; the first is kept
            with mixing(self.model, mix):
                feats = self._features(torch.cat([xb, xb[perm]]))[: xb.shape[0]]
        logits = self.union_head(feats)[:, cols]
        return self.kd(logits, target, T=cfg.kd.T, teacher_is_probs=True)

    def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, Any]]:
        cfg = self.cfg
        if self.forget_every and step > 0 and step % self.forget_every == 0:
            self._forget(step)
        gen, at = divmod(step, self.generation or 1)
        if self.generation and step > 0 and at == 0 and gen <= cfg.kd.born_again:
            self._next_generation(gen)
        for p in self.frozen:  # the last update's gradient (not in the optimizer's zero_grad)
            p.grad = None
        if step % max(cfg.events.patience, 1) == 0 and not self.budget_exhausted:
            self._event()
        if not self.pool_x:
            raise ConfigError(
                f"the query budget ({self.ledger.budget}) cannot pay for a single API event; "
                "raise --query-budget or lower recovery.iters / zo.q / recovery.per_class"
            )
        g = self.rng("batches")
        total: Tensor | None = None
        correct: Tensor | int = 0  # agreement with the APIs, on the device: one sync per update
        seen = 0
        for _ in range(cfg.meta_batch):
            i = int(torch.randint(len(self.pool_x), (1,), generator=g))
            x, t = self.pool_x[i], self.pool_t[i]
            idx = torch.randperm(x.shape[0], generator=g)[: cfg.way * (cfg.shot + cfg.query)]
            xb = x[idx].float() / 255.0 if x.dtype == torch.uint8 else x[idx]
            xb = crop_flip(xb, g).to(self.device)
            answered = self.pool_answered[i]
            if cfg.kd.grey and answered:  # the contrastive views keep their colour
                xb = random_grey(xb, g, cfg.kd.grey)
            xb = resize(xb, cfg.image_size)
            feats = self._features(xb)
            cols = self.pool_cols[i].to(self.device)
            full = self.union_head(feats)  # (B, every API's classes)
            logits = full[:, cols]
            teacher = t[idx].to(self.device)
            loss = feats.new_zeros(())
            if cfg.kd.distill and answered:
                kd = self.kd(logits, teacher, T=cfg.kd.T, teacher_is_probs=self.pool_probs[i])
                loss = cfg.kd.distill * kd
                if cfg.kd.manifold_mixup:
                    mixed = self._mixup_kd(xb, teacher, cols, self.pool_probs[i], g)
                    loss = loss + cfg.kd.distill * mixed
            if cfg.kd.union_ce and answered:
                scope, scope_cols = full, cols
                if cfg.kd.union_scope == "dataset":
                    lo, hi = self.scope_of_column[int(self.pool_cols[i][0])]  # CPU: no sync
                    scope, scope_cols = full[:, lo:hi], cols - lo
                loss = loss + cfg.kd.union_ce * union_ce(
                    scope, teacher, scope_cols, cfg.kd.union_ce_min_prob, self.pool_probs[i]
                )
            if self.teacher is not None and cfg.kd.born_again_weight:
                loss = loss + cfg.kd.born_again_weight * self.kd(
                    full, self._teacher_logits(xb), T=cfg.kd.born_again_T
                )
            if self.projection is not None:
                loss = loss + self._contrastive(x[idx], g)
            total = loss if total is None else total + loss
            if answered:  # unanswered candidates have no answers to agree with
                correct = correct + (logits.argmax(1) == teacher.argmax(1)).sum()
                seen += len(idx)
        assert total is not None
        metrics: dict[str, Any] = {"api_events": self.n_events, "queries": self.ledger.used}
        if seen:  # top-1 agreement with the APIs (no answers, no agreement)
            metrics["train_acc"] = 100.0 * int(correct) / max(seen, 1)
        return total, metrics


__all__ = ["BBKD", "CosineHead", "classifier_of", "dataset_spans"]
