"""LocalAPI: no gradient or parameter leaks, output modes, query validation, ledger charging."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from apimeta.apis import APIInfo, BlackBoxAPI, LocalAPI, QueryLedger, parse_output_mode
from apimeta.errors import InvalidQueryError, QueryBudgetExceeded
from apimeta.models import build_backbone


def make_api(output: str = "logits", budget: int | None = None, **kw) -> LocalAPI:
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, width=8, bn="standard")
    info = APIInfo(
        name="api-x",
        dataset="synthetic",
        classes=(3, 1, 4, 0, 2),
        class_names=tuple("abcde"),
        channels=3,
        image_size=32,
        output=output,
    )
    return LocalAPI(model, info, QueryLedger(budget), **kw)


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_is_black_box_api() -> None:
    api = make_api()
    assert isinstance(api, BlackBoxAPI)
    assert "api-x" in repr(api)


def test_output_carries_no_gradient_even_for_grad_inputs() -> None:
    api = make_api()
    x = images().requires_grad_(True)
    out = api.query(x)
    assert not out.requires_grad and out.grad_fn is None
    assert not out.is_inference()  # an ordinary tensor the caller may use in autograd
    with pytest.raises(RuntimeError):
        out.sum().backward()
    # usable as a constant target in the caller's graph
    (x * out.mean()).sum().backward()
    assert x.grad is not None


def test_parameters_not_reachable_from_output() -> None:
    api = make_api()
    params = {id(p) for p in api._model.parameters()}
    out = api.query(images())
    assert out.grad_fn is None and out._base is None
    refs = gc.get_referents(out)
    assert not any(id(r) in params for r in refs)
    assert all(not p.requires_grad for p in api._model.parameters())
    assert not api._model.training


def test_logits_match_model_and_modes_are_consistent() -> None:
    x = images()
    logits = make_api("logits").query(x)
    with torch.no_grad():
        ref = make_api()._model(x)
    torch.testing.assert_close(logits, ref)

    probs = make_api("probs").query(x)
    torch.testing.assert_close(probs, torch.softmax(logits, 1))
    torch.testing.assert_close(probs.sum(1), torch.ones(6))

    top2 = make_api("topk:2").query(x)
    assert ((top2 > 0).sum(1) == 2).all()
    best2 = probs.topk(2, 1)
    torch.testing.assert_close(top2.gather(1, best2.indices), best2.values)
    torch.testing.assert_close(top2.sum(1), best2.values.sum(1))

    label = make_api("label").query(x)
    assert label.shape == (6, 5) and (label.sum(1) == 1).all()
    assert torch.equal(label.argmax(1), logits.argmax(1))

    big_k = make_api("topk:50").query(x)  # K > classes: all probabilities
    torch.testing.assert_close(big_k, probs)


@pytest.mark.parametrize("mode", ["topk:0", "topk:x", "softmax", ""])
def test_bad_output_modes(mode: str) -> None:
    with pytest.raises(InvalidQueryError, match="output mode"):
        parse_output_mode(mode)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(2, 1, 32, 32), "shape"),
        (torch.rand(2, 3, 28, 28), "shape"),
        (torch.rand(3, 32, 32), "shape"),
        ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "dtype"),
        (torch.rand(2, 3, 32, 32) * 2, r"\[0, 1\]"),
        (torch.rand(2, 3, 32, 32) - 0.5, r"\[0, 1\]"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
        (torch.full((2, 3, 32, 32), float("inf")), "NaN or inf"),
        ([[0.5]], "torch tensors"),
    ],
)
def test_invalid_queries_raise_and_cost_nothing(x, match: str) -> None:
    api = make_api()
    with pytest.raises(InvalidQueryError, match=match):
        api.query(x)
    assert api.ledger.used == 0


def test_nan_hidden_among_valid_values_is_caught() -> None:
    x = images()
    x[3, 1, 5, 7] = float("nan")
    with pytest.raises(InvalidQueryError):
        make_api().query(x)


def test_ledger_charged_per_image_and_budget_enforced() -> None:
    api = make_api(budget=10, max_batch=4)  # 6 images split into chunks of 4 + 2
    api.query(images(6))
    assert api.ledger.used == 6 and api.ledger.per_api["api-x"] == 6
    api.query(images(0))  # empty batch: allowed, free
    assert api.ledger.used == 6
    with pytest.raises(QueryBudgetExceeded):
        api.query(images(5))
    assert api.ledger.used == 6
    api.query(images(4))
    assert api.ledger.remaining == 0


def test_chunked_equals_unchunked_and_eval_mode_is_deterministic() -> None:
    x = images(10)
    a = make_api(max_batch=3).query(x)
    b = make_api(max_batch=4096).query(x)
    torch.testing.assert_close(a, b)
    # eval-mode BN: one image's output does not depend on the rest of the batch
    torch.testing.assert_close(make_api().query(x[:1]), b[:1])


def test_shared_ledger_across_apis() -> None:
    ledger = QueryLedger(100)
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    info = APIInfo("a", "d", (0, 1), ("x", "y"), 3, 32)
    a = LocalAPI(m, info, ledger)
    b = LocalAPI(m, APIInfo("b", "d", (0, 1), ("x", "y"), 3, 32), ledger)
    a.query(images(3))
    b.query(images(2))
    assert ledger.per_api == {"a": 3, "b": 2} and ledger.used == 5


def test_channels_last_and_chunks_answer_as_the_plain_forward():
    from apimeta.apis.local import CPU_CHUNK
    from apimeta.testing import tiny_info, tiny_model

    calls = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_model(0)

        def forward(self, x):
            calls.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last)))
            return self.net(x)

    x = torch.rand(250, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = tiny_model(0)(x)
    fast = LocalAPI(Counting(), tiny_info("a"))
    torch.testing.assert_close(fast.query(x), want, atol=1e-5, rtol=1e-5)
    assert fast.chunk == CPU_CHUNK == 100
    assert calls == [(100, True), (100, True), (50, True)]
    calls.clear()
    plain = LocalAPI(Counting(), tiny_info("a"), channels_last=False, chunk=4096)
    torch.testing.assert_close(plain.query(x), want, atol=1e-5, rtol=1e-5)
    assert calls == [(250, False)]
    assert LocalAPI(tiny_model(0), tiny_info("a"), max_batch=30).chunk == 30
