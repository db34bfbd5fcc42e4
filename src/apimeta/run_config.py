"""The typed configuration of a training run (``apimeta train``), mirroring method.md section 7.

Loaded from a preset YAML (``apimeta/presets/<name>.yaml``) and/or a user YAML, then overridden
with ``--set key.sub=value``; the resolved config is written into every run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ZOConfig:
    """Zero-order gradient estimation (method.md 4.3, 8.5)."""

    enabled: bool = True  # false: white-box recovery with true gradients (upper bound)
    estimator: str = "forward"  # forward | central | lowres (registry apimeta.zo.ESTIMATORS)
    directions: str = "sphere"  # sphere | gaussian
    mu: float = 0.005
    q: int = 10
    chunks: int = 1
    lowres: int = 8  # r for the lowres estimator (3*r*r dims)
    device: str = "data"  # "data": draw directions on the data's device; "cpu": reference


@dataclass
class MemoryConfig:
    """Task memory replay (method.md 4.7)."""

    enabled: bool = True
    mem_batches: int = 20  # FIFO capacity per class, in recovery batches
    quantize_uint8: bool = False
    # Extensions (off = the paper): also trigger API events while the memory holds fewer than
    # this many classes (early memory tasks otherwise replay one API's classes until plateau)
    min_classes: int = 0
    # store only query-set images the API assigns to their target class (boundary query sets
    # can drift to other classes; their KD targets are still the API's outputs either way)
    filter_query: bool = False


@dataclass
class HttpConfig:
    """Client settings for a zoo served over HTTP (``zoo: http://host:port``).

    ``api_key_file``: a file holding the server's API key (else ``$APIMETA_API_KEY``).
    ``max_retries``: re-sends of a failed request (connection errors, timeouts, 429, 502-504)
    with exponential backoff ``backoff * 2**k`` capped at ``max_backoff`` seconds; when they run
    out the run stops with ``last.pt`` and can be resumed. ``bill_retries``: count re-sent images
    against ``query_budget`` too (they are always recorded under ``ledger.retries``).
    ``query_cache``: an on-disk query cache (SQLite) so a resumed run does not pay again for
    queries answered before an interruption; ``"auto"`` = ``<run dir>/query-cache.sqlite``.
    Also used by local and ONNX zoos.
    """

    api_key_file: str | None = None
    timeout: float = 30.0  # seconds per request
    max_retries: int = 5
    backoff: float = 0.5  # seconds
    max_backoff: float = 20.0
    concurrency: int = 1  # request chunks in flight at once
    bill_retries: bool = False
    query_cache: str | None = None  # path | "auto" | None


@dataclass
class RunConfig:
    """Everything a training run needs. Defaults = the ``cpu`` preset."""

    method: str = "bidf-mkd"  # registry apimeta.methods.METHODS
    dataset: str = "emoji"  # comma-separated for API-MH (emoji,kanji)
    data_root: str | None = None
    zoo: str | None = None  # zoo dir, ONNX dir or http(s)://host:port
    scenario: str = "auto"  # auto | SS | SH | MH
    api_output: str = (
        "logits"  # output mode simulated by local/ONNX zoos (servers decide their own)
    )
    seed: int = 2022
    device: str = "cpu"
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
    inner_steps: int = 5
    kd_inner_steps: int = 10
    test_steps: int = 10
    inner_lr: float = 0.01
    first_order: bool = False

    # recovery
    recover_per_class: int = 10
    recover_iters: int = 50
    gen_lr: float = 1e-3
    nz: int = 256
    ngf: int = 64
    best_iterate: str = "true_loss"  # true_loss | surrogate | last
    early_stop_prob: float | None = None  # stop recovery once every target prob exceeds this
    zo: ZOConfig = field(default_factory=ZOConfig)

    # bi-level KD
    kd_loss: str = "kl"  # kl | neg_prob_dot (reference form)
    kd_T: float = 1.0
    adv: float = 1.0  # lambda_adv of the boundary term; 0 disables it
    adv_start: int = 500  # meta-updates before the boundary term switches on
    cache_api_outputs: bool = True

    # API events and memory
    api_patience: int = 25
    # plateau: an API event after api_patience updates without a new training-accuracy max
    # (method.md 4.8) | every: an event every api_patience updates (bbkd's schedule; extension)
    event_trigger: str = "plateau"
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    query_budget: int | None = 5_000_000
    on_budget_exhausted: str = "replay"  # replay: keep training on memory | stop
    http: HttpConfig = field(default_factory=HttpConfig)  # zoo over HTTP; query cache

    # evaluation and selection
    eval_every: int = 1000  # episodes
    eval_tasks: int = 100  # meta-val tasks during training
    test_tasks: int = 600
    select_split: str = "val"  # val | test (reference; optimistic)
    transductive: bool = True

    # bookkeeping
    checkpoint_every: int = 250  # meta-updates
    out: str | None = None  # run directory
