"""Screen: distil the APIs into the backbone on *procedural* images (no data, no generator).

Each API of a zoo labels ``PER_API`` procedural images (one query each); one Conv4 with a head
over the union of the APIs' classes is trained by KD on them (each API supervises only its own
classes, as in ``bbkd``); the union head is dropped and the backbone is meta-validated with a
zero head like every other init. Random init is the first row (update 0). Sources:

- ``dead-leaves``: :func:`apimeta.candidates.dead_leaves` (the "dead leaves" image model, a
  generic natural-image prior, no dataset);
- ``noise``: :func:`apimeta.candidates.smooth_noise`;
- any other name of :data:`apimeta.candidates.SOURCES` (e.g. ``icons``);
- ``real-zoo``: a probe, NOT data-free: each API's own training data, i.e. the real meta-train
  images of its classes (20 per class), labelled by the API; what KD and the contrastive loss
  give with perfect recovery (``KD=0``: the domain's images alone, no labels);
- ``real-other``: a probe, NOT data-free: ``PER_API`` real meta-train images per API drawn
  from the classes *outside* the zoo (no API was trained on them), labelled by the API: what
  in-domain images without a class prior give (against ``real-zoo``: the APIs' own classes);
- ``pool:CHECKPOINT``: the recovered pool a ``bbkd`` run kept in its checkpoint (its images,
  the APIs' outputs on them and their columns, per API event; no new queries), e.g. the
  white-box recovery probe's;
- ``random-teacher``: dead-leaves images labelled by *random-init* Conv4s instead of the APIs
  (a control: how much of any gain is the image prior, not the APIs' knowledge).

Usage: python benchmarks/surrogate_kd.py SOURCE PER_API STEPS [SEED] [ZOO] [EVAL_AT] [SAVE]
e.g.   python benchmarks/surrogate_kd.py dead-leaves 1000 2000 2022 runs/zoos/emoji-conv4 500,1000
Prints, per evaluation point, the meta-val means (100 tasks, 1/5-shot) per fine-tuning lr
(0.01, 0.1) and head start (zero, random); SAVE: a path prefix for the model's state_dict at
each point (``SAVE-step1000.pt``). EVAL_AT may include 0 (the random init itself).
Environment: ``REINIT=0,2`` also scores each point with ``eval.reinit`` 2 (the last two feature
stages re-drawn); ``FREEZE_TOP=2`` trains with the last two stages frozen at their init (the
union head learns through them), the training-side match of ``eval.reinit``. ``SSL=W`` adds W x a
SimCLR loss (NT-Xent, temperature ``SSL_T``, default 0.2, a 2-layer projection) between two strongly augmented
views of the same candidates (no extra queries); ``KD=0`` drops the KD loss (SSL alone, a
control). ``LRS=0.1`` / ``HEADS=random`` narrow the meta-val grid. ``ALL_APIS=1``: one pool of
``PER_API`` images, each labelled by every API (the same queries as ``PER_API`` per API, 20x
fewer distinct images), KD to every API on each batch. ``KD_T=4``: the KD temperature (default
the config's, 1). ``SSL_FRESH=1``: the contrastive views come from new unlabelled images of the
source each batch (no queries), not from the KD batch. ``RESET_EVERY=N``: every N steps the
last two stages and the union head are re-drawn (seeded; their Adam state dropped), so the low
stages learn to serve a fresh top, the training-side match of ``reinit=2`` ("zapping").
``REFINE=K``: surrogate-guided candidates. From step ``REFINE_FROM`` (default 100), every
``REFINE_EVERY`` steps (default 100) each API gets ``REFINE_N`` (default 100) new candidates:
fresh images of the source, each moved K Adam steps (lr 0.05, on an offset of
``REFINE_RES`` x ``REFINE_RES`` (default 8) upsampled to the image, under crop + flip) to raise
the *student's* log-probability of a random class of that API (white-box on the learner's own
model, no queries), then labelled by the API with one query each and added to its pool. ``REFINE=0`` with the same schedule adds unrefined images
(the control). Printed: how often the API's top class is the targeted one.
``UNION_CE=W``: adds W x a cross-entropy over the *whole* union head (every API's classes)
with the API's top class as a hard label, on the images where the API's top probability is
above ``UNION_CE_P`` (default 0): the per-API KD only ever contrasts an API's own classes, this
contrasts classes of different APIs too (what MAML on the owners' data does).
``SUPCON=W`` (with ``SSL``): adds W x a supervised contrastive loss (SupCon) on the same two
views' projections, where two images are also positives when the API puts both in the same
class with top probability above ``SUPCON_P`` (default 0.8): the APIs' answers shape the
contrastive geometry, not only the union head.
``KD_STRONG=W`` (with ``SSL``): adds W x the per-API KD on each of the two strong views (the
API's answer on the plain image as the target; FixMatch-style consistency, no queries), so the
features of heavily augmented images must still carry the API's class.
``SHALLOW=W``: adds W x the same KD (and union CE, at ``UNION_CE``'s weight) through a second
union head on the average-pooled output of feature stage 1 (block 1, the one ``reinit=2`` keeps
on top of block 0), so the APIs' answers reach the blocks meta-test keeps directly.
``KD_FROM=N``: the KD and union CE are off for the first N steps (the contrastive loss alone,
as in the control ``KD=0 UNION_CE=0``), then on: the APIs' answers on top of a self-supervised
start, sequential instead of joint.
``SSL_COLOR=1``: SimCLR's full colour distortion on the contrastive views: after the
brightness / contrast jitter, saturation x U(0.6, 1.4), a hue rotation of U(-0.1, 0.1) turns
(in YIQ) and grey with p 0.2 (``transforms.colour_distort``, the library's
``kd.contrastive_colour``).
``SSL_MIN_AREA`` (0.25), ``SSL_JITTER`` (0.4), ``SSL_SAT`` (0.4), ``SSL_HUE`` (0.1),
``SSL_GREY`` (0.2): the contrastive views' strengths (the crop's smallest area, the brightness /
contrast jitter, and with ``SSL_COLOR`` the saturation, hue and grey of ``colour_distort``);
the defaults are the library's.
``SSL_BIG=1``: one NT-Xent over the views of all ``meta_batch`` batches of an update (4 x 80
images: negatives from every API's candidates) instead of one per batch of 80.
``ROT=W``: adds W x a rotation prediction loss (RotNet: each KD batch image turned by 0, 90, 180
or 270 degrees at random, a 4-way head on the features predicts which; no queries).
``SSL_BN=1``: SimCLR's projection with batch norm (Linear-BN-ReLU-Linear) instead of
Linear-ReLU-Linear. ``SSL_CROPS=K``: multi-crop (SwAV): K more views per image, crops of
``SSL_SMALL_AREA`` (0.05) to ``SSL_MIN_AREA`` of it resized to the input size, each contrasted
with both large views (NT-Xent), the loss averaged over the 1 + K pair groups.
``OUTER_LR=LR``: Adam's learning rate (default the preset's ``outer_lr``, 0.001).
``KD_PROJ=1``: the union head (KD, union CE) reads a hidden layer (Linear-ReLU, 256) of the
features, as the contrastive loss reads its projection, instead of the features themselves.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apimeta.apis.ledger import QueryLedger
from apimeta.apis.runtime import load_run_apis
from apimeta.candidates import draw_candidates
from apimeta.config import from_dict
from apimeta.evaluate import evaluate_with_config, with_protocol
from apimeta.losses import kd_kl, nt_xent, union_ce
from apimeta.methods.bbkd import classifier_of
from apimeta.models.meta import load_init, load_run_datasets
from apimeta.models.stages import feature_stages
from apimeta.run_config import RunConfig, base_config
from apimeta.seeding import derive_seed
from apimeta.transforms import color_jitter, colour_distort, crop_flip, resized_crop_flip


def screen_config(seed: int, zoo: str) -> RunConfig:
    """The ``cpu`` preset on emoji with ``zoo`` and ``seed``: the config of every screen here."""
    return from_dict(
        RunConfig, {**base_config("cpu", []), "zoo": zoo, "dataset": "emoji", "seed": seed}
    )


def meta_val(
    model: nn.Module, ds, cfg: RunConfig, lrs=(0.01, 0.1), heads=("zero", "random"), reinits=(0,)
) -> str:
    """Meta-val means (100 tasks, 1-shot/5-shot) per fine-tuning lr, head start and
    ``eval.reinit`` (the ``REINIT`` environment variable, e.g. ``0,2``)."""
    parts = []
    for reinit in reinits:
        for head in heads:
            for lr in lrs:
                res = evaluate_with_config(
                    model, ds, with_protocol(cfg, {"lr": lr, "head": head, "reinit": reinit}),
                    split="val", shots=(1, 5), tasks=100,
                )  # fmt: skip
                tag = f"{head} lr={lr:g}" + (f" reinit={reinit}" if reinit else "")
                parts.append(f"{tag}: {res['1-shot']['mean']:.2f}/{res['5-shot']['mean']:.2f}")
    return "  ".join(parts)


def supcon(z1: Tensor, z2: Tensor, labels: Tensor, tau: float) -> Tensor:
    """SupCon (Khosla et al., 2020) on projections (B, D) of two views of B images; ``labels``
    (B,): images with the same label are positives of each other (a unique label: only the
    other view), every other view a negative."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logp = (z @ z.T / tau).fill_diagonal_(float("-inf")).log_softmax(1)
    lab = torch.cat([labels, labels])
    pos = (lab[:, None] == lab[None]).fill_diagonal_(False)
    return -(logp.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()


def refine(
    model: nn.Module,
    union: nn.Module,
    feats: list,
    x0: Tensor,
    cols: Tensor,
    steps: int,
    g: torch.Generator,
    res: int = 8,
) -> tuple[Tensor, Tensor]:
    """(images (n, 3, s, s) in [0, 1], target column index (n,)): ``x0`` moved ``steps`` Adam
    steps so the student's softmax over ``cols`` (one API's classes) favours a random target."""
    n, _, size, _ = x0.shape
    target = torch.randint(len(cols), (n,), generator=g)
    if steps == 0:
        return x0, target
    offset = torch.zeros(n, 3, res, res, requires_grad=True)
    opt = torch.optim.Adam([offset], lr=0.05)

    def moved() -> Tensor:
        up = F.interpolate(offset, size=(size, size), mode="bilinear", align_corners=False)
        return (x0 + up).clamp(0, 1)

    was = model.training
    model.eval()
    for _ in range(steps):
        feats.clear()
        model(crop_flip(moved(), g))
        logits = union(feats[-1])[:, cols]
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.train(was)
    model.zero_grad(set_to_none=True)
    union.zero_grad(set_to_none=True)
    with torch.no_grad():
        return moved(), target


def main(source: str, per_api: int, steps: int, seed: int = 2022,
         zoo: str = "runs/zoos/emoji-conv4", eval_at: str = "", save: str = "") -> None:  # fmt: skip
    torch.set_num_threads(1)
    cfg = screen_config(seed, zoo)
    datasets = load_run_datasets(cfg)
    ds = datasets[0]
    model = load_init(None, cfg, datasets)
    ledger = QueryLedger(None)
    apis = load_run_apis(cfg, ledger)
    g = torch.Generator().manual_seed(seed)
    size = cfg.image_size
    keys = sorted({(a.info.dataset, int(c)) for a in apis for c in a.info.classes})
    column = {k: i for i, k in enumerate(keys)}
    pool_x, pool_t, pool_c = [], [], []
    t0 = time.time()
    all_apis = os.environ.get("ALL_APIS", "0") == "1"  # one pool, labelled by every API
    name = {"noise": "smooth-noise", "random-teacher": "dead-leaves"}.get(source, source)
    shared = draw_candidates(name, per_api, size, 3, g) if all_apis else None
    train = ds.split("train")
    for a in [] if source.startswith("pool:") else apis:
        if source == "real-zoo":  # the API's own classes' real training images (a probe)
            mask = torch.isin(train.labels, torch.tensor([int(c) for c in a.info.classes]))
            x = train.images[mask].float() / 255.0
        elif source == "real-other":  # real images of classes no API has (a probe)
            zoo_classes = torch.tensor([k[1] for k in keys])
            other = torch.nonzero(~torch.isin(train.labels, zoo_classes)).flatten()
            pick = other[torch.randperm(len(other), generator=g)[:per_api]]
            x = train.images[pick].float() / 255.0
        else:
            x = shared if shared is not None else draw_candidates(name, per_api, size, 3, g)
        if source == "random-teacher":
            teacher = load_init(
                None, dataclasses.replace(cfg, seed=seed + 1 + len(pool_x)), datasets
            )
            with torch.no_grad():
                head = classifier_of(teacher)
                head.weight.normal_(0, 0.05, generator=g)
                t = teacher(x)[:, : a.info.n_classes]
        else:
            t = a.query(x)
        pool_x.append(x)
        pool_t.append(t)
        pool_c.append(torch.tensor([column[(a.info.dataset, int(c))] for c in a.info.classes]))
    if source.startswith("pool:"):  # a bbkd run's recovered pool, one entry per API event
        extra = torch.load(source[5:], weights_only=True, map_location="cpu")["extra"]
        pool_x, pool_t, pool_c = extra["pool_x"], extra["pool_t"], extra["pool_cols"]
    print(f"{source}: {len(apis)} APIs x {per_api} images, {ledger.used} queries, "
          f"{time.time() - t0:.0f}s; union of {len(keys)} classes", flush=True)  # fmt: skip

    head = classifier_of(model)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    feats: list[Tensor] = []
    head.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    with torch.random.fork_rng(devices=[]):  # seeded: the global RNG differs per process
        torch.manual_seed(derive_seed(seed, "surrogate-kd", "union-head"))
        union = nn.Linear(head.in_features, len(keys))
        proj = nn.Sequential(nn.Linear(head.in_features, 256), nn.ReLU(), nn.Linear(256, 128))
        if os.environ.get("SSL_BN", "0") == "1":  # SimCLR's projection: Linear-BN-ReLU-Linear
            proj = nn.Sequential(
                nn.Linear(head.in_features, 256), nn.BatchNorm1d(256), nn.ReLU(),
                nn.Linear(256, 128),
            )  # fmt: skip
        shallow_w = float(os.environ.get("SHALLOW", "0"))  # KD through block 1's pooled output
        block1 = [*feature_stages(model)[1].modules()]
        convs = [m for m in block1 if isinstance(m, nn.Conv2d)]
        shallow = nn.Linear(convs[-1].out_channels, len(keys)) if shallow_w else None
        rot_w = float(os.environ.get("ROT", "0"))  # rotation prediction (RotNet)
        rot_head = nn.Linear(head.in_features, 4) if rot_w else None
        if os.environ.get("KD_PROJ", "0") == "1":  # the answers' heads read a hidden layer
            union = nn.Sequential(
                nn.Linear(head.in_features, 256), nn.ReLU(), nn.Linear(256, len(keys))
            )
    mid: list[Tensor] = []
    recording = [False]  # block 1's output is kept only in the KD forward (not at meta-val)
    if shallow is not None:  # on the stage's last module: a Conv4 stage is a slice, never called
        block1[-1].register_forward_hook(lambda m, i, o: mid.append(o) if recording[0] else None)
    ssl_w = float(os.environ.get("SSL", "0"))
    kd_w = float(os.environ.get("KD", "1"))
    kd_t = float(os.environ.get("KD_T", str(cfg.kd.T)))  # KD temperature
    ssl_fresh = os.environ.get("SSL_FRESH", "0") == "1"  # SSL on new unlabelled images
    ssl_t = float(os.environ.get("SSL_T", "0.2"))  # the contrastive loss's temperature
    reset_every = int(os.environ.get("RESET_EVERY", "0"))  # re-draw the top every N steps
    stages = feature_stages(model)
    frozen = int(os.environ.get("FREEZE_TOP", "0"))  # keep the last N stages at their init
    for stage in stages[len(stages) - frozen :] if frozen else []:
        stage.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    extra = [*union.parameters(), *(proj.parameters() if ssl_w else ())]
    extra += [*shallow.parameters()] if shallow is not None else []
    extra += [*rot_head.parameters()] if rot_head is not None else []
    outer_lr = float(os.environ.get("OUTER_LR", str(cfg.outer_lr)))  # Adam's lr
    opt = torch.optim.Adam([*trainable, *extra], lr=outer_lr)
    points = sorted({int(v) for v in eval_at.split(",") if v} | {steps})
    reinits = tuple(int(v) for v in os.environ.get("REINIT", "0").split(","))
    grid = {
        "reinits": reinits,
        "lrs": tuple(float(v) for v in os.environ.get("LRS", "0.01,0.1").split(",")),
        "heads": tuple(os.environ.get("HEADS", "zero,random").split(",")),
    }
    union_w = float(os.environ.get("UNION_CE", "0"))  # CE over the whole union head
    union_ce_p = float(os.environ.get("UNION_CE_P", "0"))
    supcon_w = float(os.environ.get("SUPCON", "0"))  # SupCon with the APIs' confident classes
    supcon_p = float(os.environ.get("SUPCON_P", "0.8"))
    kd_strong = float(os.environ.get("KD_STRONG", "0"))  # KD on the strong views too
    kd_from = int(os.environ.get("KD_FROM", "0"))  # the answers' losses start after N steps
    ssl_colour = os.environ.get("SSL_COLOR", "0") == "1"  # SimCLR's full colour distortion
    ssl_big = os.environ.get("SSL_BIG", "0") == "1"  # one NT-Xent over the whole update
    if ssl_big and (supcon_w or kd_strong or not ssl_w or int(os.environ.get("SSL_CROPS", "0"))):
        sys.exit("SSL_BIG needs SSL > 0 and neither SUPCON, KD_STRONG nor SSL_CROPS")

    # the views' strengths (SSL_MIN_AREA, SSL_JITTER, SSL_SAT, SSL_HUE, SSL_GREY; the library's)
    min_area = float(os.environ.get("SSL_MIN_AREA", "0.25"))
    jitter = float(os.environ.get("SSL_JITTER", "0.4"))
    sat, hue, grey_p = (
        float(os.environ.get(k, d))
        for k, d in (("SSL_SAT", "0.4"), ("SSL_HUE", "0.1"), ("SSL_GREY", "0.2"))
    )

    # multi-crop (SwAV): SSL_CROPS small views per image (SSL_SMALL_AREA..min_area of it,
    # default 0.05), each contrasted with both large views
    n_small = int(os.environ.get("SSL_CROPS", "0"))
    small_area = float(os.environ.get("SSL_SMALL_AREA", "0.05"))

    def views_of(src: Tensor) -> list[Tensor]:
        out = [color_jitter(resized_crop_flip(src, g, min_area), g, jitter) for _ in "ab"]
        out += [
            color_jitter(resized_crop_flip(src, g, small_area, max_area=min_area), g, jitter)
            for _ in range(n_small)
        ]
        if not ssl_colour:
            return out
        return [colour_distort(v, g, sat, hue, grey_p) for v in out]

    def contrast(z: Tensor) -> Tensor:
        """NT-Xent of the two large views, plus each small view against both (multi-crop),
        averaged over the pairs' groups: (2 + n_small) B projections -> a scalar."""
        zs = z.chunk(2 + n_small)
        loss = nt_xent(zs[0], zs[1], tau=ssl_t)
        for s in zs[2:]:
            loss = loss + 0.5 * (nt_xent(s, zs[0], tau=ssl_t) + nt_xent(s, zs[1], tau=ssl_t))
        return loss / (1 + n_small)

    if (supcon_w or kd_strong) and (not ssl_w or ssl_fresh):
        sys.exit("SUPCON / KD_STRONG need SSL > 0 on the KD batch (its views and labels)")
    refine_k = os.environ.get("REFINE")  # surrogate-guided candidates (None: off)
    refine_from = int(os.environ.get("REFINE_FROM", "100"))
    refine_every = int(os.environ.get("REFINE_EVERY", "100"))
    refine_n = int(os.environ.get("REFINE_N", "100"))
    refine_res = int(os.environ.get("REFINE_RES", "8"))  # the offset's resolution
    if refine_k is not None and (all_apis or source.startswith("pool:")):
        sys.exit("REFINE needs one pool per API (not ALL_APIS, not a pool: source)")
    if 0 in points:
        print(f"step 0 (random init): {meta_val(model, ds, cfg, **grid)}", flush=True)
    t0, agree, seen = time.time(), 0, 0
    for step in range(1, steps + 1):
        loss = torch.zeros(())
        big: list[Tensor] = []  # SSL_BIG: every batch's contrastive images of this update
        on = float(step > kd_from)  # 0: the answers' losses are off (KD_FROM)
        for _ in range(cfg.meta_batch):  # one batch per API, meta_batch APIs per update
            i = int(torch.randint(len(pool_x), (1,), generator=g))
            idx = torch.randperm(len(pool_x[i]), generator=g)[:80]
            feats.clear()
            mid.clear()
            recording[0] = bool(shallow_w)
            model(crop_flip(pool_x[i][idx], g))
            recording[0] = False
            full = union(feats[-1])
            if shallow is not None:
                s_full = shallow(mid[-1].mean((2, 3)))
                loss = loss + shallow_w * kd_kl(s_full[:, pool_c[i]], pool_t[i][idx], T=kd_t)
                if union_w:
                    s_ce = union_ce(s_full, pool_t[i][idx], pool_c[i], union_ce_p)
                    loss = loss + shallow_w * union_w * s_ce
            logits = full[:, pool_c[i]]
            if all_apis:  # the same images seen by every API: KD to each on its classes
                kd = [
                    kd_kl(full[:, c], t[idx], T=kd_t) for c, t in zip(pool_c, pool_t, strict=True)
                ]
                loss = loss + on * kd_w * torch.stack(kd).mean()
            else:
                loss = loss + on * kd_w * kd_kl(logits, pool_t[i][idx], T=kd_t)
            if ssl_w:  # the contrastive images: the KD batch's, or fresh ones (SSL_FRESH)
                src = draw_candidates(name, len(idx), size, 3, g) if ssl_fresh else pool_x[i][idx]
            if ssl_w and ssl_big:
                big.append(src)
            elif ssl_w:
                views = views_of(src)
                feats.clear()
                model(torch.cat(views))
                z = proj(feats[-1])
                f1, f2 = z[: 2 * len(idx)].chunk(2)
                if kd_strong:
                    strong = union(feats[-1][: 2 * len(idx)])[:, pool_c[i]]  # (2B, classes)
                    target = pool_t[i][idx].repeat(2, 1)
                    loss = loss + kd_strong * kd_kl(strong, target, T=kd_t)
                loss = loss + ssl_w * contrast(z)
                if supcon_w:
                    p_top, top = pool_t[i][idx].softmax(1).max(1)
                    unique = torch.arange(len(idx)) + pool_t[i].shape[1]  # only its other view
                    labels = torch.where(p_top > supcon_p, top, unique)
                    loss = loss + supcon_w * supcon(f1, f2, labels, ssl_t)
            if rot_head is not None:
                k = torch.randint(4, (len(idx),), generator=g)
                xr = pool_x[i][idx]
                turns = torch.stack([torch.rot90(xr, r, (2, 3)) for r in range(4)])
                turned = turns[k, torch.arange(len(idx))]  # (B, C, H, W), image b turned k[b]
                feats.clear()
                model(crop_flip(turned, g))
                loss = loss + rot_w * F.cross_entropy(rot_head(feats[-1]), k)
            if union_w:
                loss = loss + on * union_w * union_ce(full, pool_t[i][idx], pool_c[i], union_ce_p)
            agree += int((logits.argmax(1) == pool_t[i][idx].argmax(1)).sum())
            seen += len(idx)
        if big:  # SSL_BIG: one contrastive loss over all of this update's images
            feats.clear()
            model(torch.cat(views_of(torch.cat(big))))
            f1, f2 = proj(feats[-1]).chunk(2)
            loss = loss + cfg.meta_batch * ssl_w * nt_xent(f1, f2, tau=ssl_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (
            refine_k is not None
            and step >= refine_from
            and step % refine_every == 0
            and step < steps
        ):
            hit = 0
            for i, a in enumerate(apis):
                x0 = draw_candidates(name, refine_n, size, 3, g)
                x, target = refine(model, union, feats, x0, pool_c[i], int(refine_k), g, refine_res)
                t = a.query(x)
                hit += int((t.argmax(1) == target).sum())
                pool_x[i] = torch.cat([pool_x[i], x])
                pool_t[i] = torch.cat([pool_t[i], t])
            print(f"step {step}: refined {len(apis)} x {refine_n} (K={refine_k}), API top = "
                  f"target {100 * hit / (len(apis) * refine_n):.1f}%, {ledger.used} queries",
                  flush=True)  # fmt: skip
        if reset_every and step % reset_every == 0 and step < steps:
            # "zapping": re-draw the top two stages and the union head (fresh Adam state), so
            # the low stages learn to serve a fresh top, as at meta-test with reinit=2
            top = [m for st in stages[-2:] for m in st.modules() if m is not st] + [union]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "surrogate-kd", "reset", step))
                for m in top:
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            for m in top:
                for p in m.parameters(recurse=False):
                    opt.state.pop(p, None)
        if step in points:
            if save:
                torch.save(model.state_dict(), f"{save}-step{step}.pt")
            print(f"step {step} ({time.time() - t0:.0f}s train, agreement "
                  f"{100 * agree / seen:.1f}%): {meta_val(model, ds, cfg, **grid)}",
                  flush=True)  # fmt: skip
            agree = seen = 0


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), *(int(a[3]),) if len(a) > 3 else (), *a[4:])
