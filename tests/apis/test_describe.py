"""Bring your own API: description files, a third-party v2 server, a foreign ONNX model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from apimeta.apis import QueryLedger, load_zoo
from apimeta.apis.describe import InputAdapter, ModelSpec, read_description
from apimeta.apis.http import HttpAPI, ProtocolMismatchError
from apimeta.apis.onnx import OnnxAPI
from apimeta.errors import CheckpointError, ConfigError
from apimeta.testing import UvicornThread, foreign_v2_app, tiny_model

C, S, N = 3, 32, 5


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, C, S, S, generator=torch.Generator().manual_seed(seed))


def write(path, data):
    path.write_text(yaml.safe_dump(data) if path.suffix != ".json" else json.dumps(data))
    return path


# ----------------------------------------------------------------------------- parsing


def test_a_missing_description_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"API description file .*nope\.yaml does not exist"):
        load_zoo(tmp_path / "nope.yaml")


def test_missing_class_information_is_one_error_naming_what_to_give(tmp_path):
    p = write(
        tmp_path / "apis.yaml",
        {"source": "http://127.0.0.1:1", "models": {"a": {"dataset": "emoji"}, "b": {}}},
    )
    with pytest.raises(ConfigError) as e:
        read_description(p)
    msg = str(e.value)
    assert "'a' lacks classes, output" in msg and "'b' lacks classes, dataset, output" in msg


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"layot": "flat"}, "unknown key(s) layot"),
        ({"layout": "chw"}, "layout must be one of nchw, nhwc, flat"),
        ({"output": "scores"}, "output mode must be one of"),
        ({"classes": [1, "a"]}, "all integer ids or all names"),
        ({"classes": [1, 1]}, "listed twice"),
        ({"mean": [0.5]}, "give mean and std together"),
        ({"mean": [0.5], "std": [0.2], "input_range": [0, 255]}, "not both"),
        ({"input_range": [1, 0]}, "lo < hi"),
        ({"channels": 0}, "channels must be a positive integer"),
    ],
)
def test_bad_descriptions_are_one_line_errors(tmp_path, change, needle):
    model = {"classes": [1, 2], "dataset": "mine", "output": "probs", **change}
    p = write(tmp_path / "apis.yaml", {"source": "http://127.0.0.1:1", "models": {"m": model}})
    with pytest.raises(ConfigError) as e:
        read_description(p)
    assert needle in str(e.value)


def test_class_names_resolve_against_a_dataset_or_number_an_own_label_set(tmp_path):
    lookups = []

    def names_of(dataset, root, size):
        lookups.append(dataset)
        return [f"class{c:03d}" for c in range(36)]

    p = write(
        tmp_path / "apis.json",
        {
            "source": "http://127.0.0.1:1",
            "output": "logits",
            "models": {
                "syn": {"dataset": "synthetic", "classes": ["class012", "class003"]},
                "own1": {"dataset": "pets", "classes": ["cat", "dog"]},
                "own2": {"dataset": "pets", "classes": ["fox", "cat"]},
                "ids": {"dataset": "synthetic", "classes": [4, 5], "class_names": ["x", "y"]},
            },
        },
    )
    d = read_description(p, class_names_of=names_of)
    by = {m.name: m for m in d.models}
    assert by["syn"].classes == (12, 3) and lookups == ["synthetic"]  # looked up once
    assert by["own1"].classes == (0, 1) and by["own2"].classes == (2, 0)  # "cat" shared
    assert by["own2"].class_names == ("fox", "cat") and by["ids"].class_names == ("x", "y")
    assert d.is_http and d.datasets() == ["synthetic", "pets"]
    bad = write(
        tmp_path / "bad.yaml",
        {"source": "http://h:1", "models": {"m": {"dataset": "synthetic", "classes": ["zebra"],
                                                  "output": "probs"}}},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="'zebra' are not class names of dataset 'synthetic'"):
        read_description(bad, class_names_of=names_of)


def test_input_adapter_layouts_and_scaling():
    x = images(2)
    np.testing.assert_array_equal(InputAdapter()(x), x.numpy())
    nhwc = InputAdapter("nhwc")(x)
    assert nhwc.shape == (2, S, S, C) and np.allclose(nhwc[1, 4, 7], x[1, :, 4, 7].numpy())
    flat = InputAdapter("flat", input_range=(0.0, 255.0))(x)
    assert flat.shape == (2, C * S * S) and np.allclose(flat, x.reshape(2, -1).numpy() * 255)
    norm = InputAdapter(mean=(0.5,) * 3, std=(0.25,) * 3, dtype="FP64")(x)
    assert norm.dtype == np.float64 and np.allclose(norm, (x.double().numpy() - 0.5) / 0.25)


def test_spec_fills_and_checks_the_input_from_the_model_shape():
    spec = ModelSpec("m", "d", (1, 2, 3), ("a", "b", "c"), "probs")
    info = spec.complete([-1, C, S, S], [-1, 3], "m")
    assert (info.channels, info.image_size, info.n_classes) == (C, S, 3)
    flat = ModelSpec("m", "d", (1, 2, 3), ("a", "b", "c"), "probs", channels=3,
                     adapter=InputAdapter("flat"))  # fmt: skip
    assert flat.complete([None, 3 * 28 * 28], ["batch", 3], "m").image_size == 28
    with pytest.raises(ConfigError, match="does not show its channels"):
        ModelSpec("m", "d", (1,), ("a",), "probs", adapter=InputAdapter("flat")).complete(
            [-1, 300], [-1, 1], "m"
        )
    with pytest.raises(ConfigError, match="returns shape \\[-1, 5\\], but 3 classes"):
        spec.complete([-1, C, S, S], [-1, 5], "m")
    with pytest.raises(ConfigError, match="description means \\[B, 1, 32, 32\\]"):
        ModelSpec("m", "d", (1,), ("a",), "probs", channels=1).complete([-1, 3, 32, 32], None, "m")
    with pytest.raises(ConfigError, match="not a nhwc image batch"):
        ModelSpec("m", "d", (1,), ("a",), "probs", adapter=InputAdapter("nhwc")).complete(
            [-1, 3072], None, "m"
        )


# ----------------------------------------------------------------------------- a v2 server


@pytest.fixture(scope="module")
def foreign_server():
    models = {"alpha": tiny_model(0), "beta": tiny_model(1)}
    app = foreign_v2_app(models, C, S)
    with UvicornThread(app) as srv:
        yield srv.url, models, app


def server_description(tmp_path, url, **extra):
    return write(
        tmp_path / "apis.yaml",
        {
            "source": url,
            "dataset": "synthetic",
            "output": "probs",
            "layout": "flat",
            "channels": C,
            "input_range": [0, 255],
            "output_name": "probabilities",
            "models": {
                "alpha": {"classes": [f"class{c:03d}" for c in (10, 11, 12, 13, 14)]},
                "beta": {"classes": [12, 13, 14, 15, 16]},
            },
            **extra,
        },
    )


def test_a_foreign_server_without_a_description_is_refused_clearly(foreign_server):
    url, _, _ = foreign_server
    with pytest.raises(ConfigError, match="does not say its dataset, classes, output"):
        HttpAPI(url, "alpha")
    with pytest.raises(ProtocolMismatchError, match="give one model as http://host:port/v2/"):
        load_zoo(url)  # no model repository extension: says what to do


def test_a_described_foreign_server_answers_through_the_contract(foreign_server, tmp_path):
    url, models, app = foreign_server
    ledger = QueryLedger(budget=50)
    apis = load_zoo(server_description(tmp_path, url), ledger=ledger)
    assert [a.info.name for a in apis] == ["alpha", "beta"]
    alpha, beta = apis
    assert isinstance(alpha, HttpAPI) and not alpha.session.binary  # not advertised
    assert (alpha.input_name, alpha.output_name) == ("pixel_values", "probabilities")
    assert alpha.info.classes == (10, 11, 12, 13, 14) and beta.info.classes[0] == 12
    assert (alpha.info.channels, alpha.info.image_size, alpha.info.output) == (C, S, "probs")
    before = app.state.images
    x = images(7, seed=3)
    got = alpha.query(x)
    with torch.no_grad():
        want = torch.softmax(models["alpha"](x), 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # scaled to [0, 255] and back
    assert app.state.images - before == 7 and ledger.used == 7
    with pytest.raises(Exception, match="budget"):
        beta.query(images(44))
    assert app.state.images - before == 7  # refused before anything was sent


def test_described_names_and_widths_are_checked_when_the_zoo_loads(foreign_server, tmp_path):
    url, _, _ = foreign_server
    with pytest.raises(ConfigError, match="has no output 'logits'"):
        load_zoo(server_description(tmp_path, url, output_name="logits"))
    with pytest.raises(ConfigError, match="takes input 'pixel_values', not 'input'"):
        load_zoo(server_description(tmp_path, url, input_name="input"))
    d = server_description(tmp_path, url)
    data = yaml.safe_load(d.read_text())
    data["models"]["alpha"]["classes"] = [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="but 4 classes are described"):
        load_zoo(write(d, data))
    data["models"]["alpha"]["classes"] = [1, 2, 3, 4, 5]
    data["image_size"] = 28
    with pytest.raises(ConfigError, match="description means \\[B, 2352\\]"):
        load_zoo(write(d, data))


# ----------------------------------------------------------------------------- foreign ONNX


class MLP(nn.Module):
    """A flat-input MLP returning probabilities (a typical exported scikit-style model)."""

    def __init__(self, n: int = N):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(C * S * S, 16)
        self.fc2 = nn.Linear(16, n)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.05

    def forward(self, x):
        return torch.softmax(self.fc2(torch.relu(self.fc1(x))), 1)


@pytest.fixture(scope="module")
def foreign_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign-onnx")
    model = MLP().eval()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.rand(2, C * S * S),),
            str(root / "mlp.onnx"),
            input_names=["x"],
            output_names=["probs"],
            dynamic_axes={"x": {0: "n"}, "probs": {0: "n"}},
            dynamo=False,
        )
    return root, model


def foreign_entry(**kw):
    e = {"name": "mlp", "onnx_file": "mlp.onnx", "dataset": "synthetic",
         "classes": [10, 11, 12, 13, 14], "output": "probs", "layout": "flat", "channels": C}  # fmt: skip
    return {**e, **kw}


def zoo_with(root, *entries):
    (root / "zoo.json").write_text(json.dumps({"version": 1, "apis": list(entries)}))
    return root


def test_a_foreign_onnx_model_in_a_zoo(foreign_onnx):
    root, model = foreign_onnx
    (api,) = load_zoo(zoo_with(root, foreign_entry()), ledger=QueryLedger())
    assert isinstance(api, OnnxAPI) and (api.input_name, api.output_name) == ("x", "probs")
    assert (api.info.channels, api.info.image_size) == (C, S)  # the side from the graph
    x = images(6, seed=1)
    with torch.no_grad():
        want = model(x.reshape(6, -1))
    torch.testing.assert_close(api.query(x), want, atol=1e-5, rtol=1e-5)  # no second softmax
    with pytest.raises(ConfigError, match="returns 'probs'; it cannot answer 'topk:2'"):
        load_zoo(root, output="topk:2")


def test_foreign_onnx_entries_are_checked_when_the_zoo_loads(foreign_onnx):
    root, _ = foreign_onnx
    bare = {"name": "mlp", "onnx_file": "mlp.onnx"}
    with pytest.raises(ConfigError, match="lacks key\\(s\\) dataset, classes, output; a foreign"):
        load_zoo(zoo_with(root, bare))
    with pytest.raises(ConfigError, match="returns shape \\['n', 5\\], but 4 classes"):
        load_zoo(zoo_with(root, foreign_entry(classes=[1, 2, 3, 4])))
    with pytest.raises(ConfigError, match="has no input 'pixels' \\(inputs: x\\)"):
        load_zoo(zoo_with(root, foreign_entry(input_name="pixels")))
    with pytest.raises(ConfigError, match="not a nchw image batch"):
        load_zoo(zoo_with(root, foreign_entry(layout="nchw")))
    with pytest.raises(ConfigError, match="onnx backend"):
        load_zoo(zoo_with(root, foreign_entry()), backend="torch")


def test_missing_external_weights_say_which_file(foreign_onnx, tmp_path):
    import onnx

    root, _ = foreign_onnx
    model = onnx.load(str(root / "mlp.onnx"))
    onnx.save(model, str(tmp_path / "mlp.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="mlp.onnx.data", size_threshold=0)  # fmt: skip
    (tmp_path / "mlp.onnx.data").unlink()
    with pytest.raises(
        CheckpointError, match=r"keeps its weights in mlp\.onnx\.data, which is miss"
    ):
        load_zoo(zoo_with(tmp_path, foreign_entry()))


def test_a_description_of_onnx_files_and_zoo_show(foreign_onnx, tmp_path):
    from apimeta.cli import app

    root, _ = foreign_onnx
    d = write(
        tmp_path / "apis.yaml",
        {
            "source": str(root),
            "models": {"mlp": {k: v for k, v in foreign_entry().items() if k != "name"}},
        },
    )
    (api,) = load_zoo(d)
    assert isinstance(api, OnnxAPI) and api.info.classes == (10, 11, 12, 13, 14)
    res = CliRunner().invoke(app, ["zoo", "show", str(d)])
    assert res.exit_code == 0, res.output
    assert "mlp" in res.output and "1 API" in res.output
    res = CliRunner().invoke(app, ["zoo", "show", str(zoo_with(root, foreign_entry()))])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(d.read_text())
    data["models"]["mlp"]["classes"] = [1, 2]
    res = CliRunner().invoke(app, ["zoo", "show", str(write(d, data))])
    assert res.exit_code == 2 and "but 2 classes are described" in " ".join(res.output.split())


def test_a_float64_onnx_model_gets_float64_input(tmp_path):
    model = MLP().double().eval()
    with torch.no_grad():
        torch.onnx.export(model, (torch.rand(2, C * S * S, dtype=torch.float64),),
                          str(tmp_path / "mlp.onnx"), input_names=["x"], output_names=["probs"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)  # fmt: skip
    (api,) = load_zoo(zoo_with(tmp_path, foreign_entry()))
    assert api.adapter.dtype == "FP64"
    x = images(3, seed=2)
    with torch.no_grad():
        want = model(x.double().reshape(3, -1)).float()
    torch.testing.assert_close(api.query(x), want, atol=1e-6, rtol=1e-6)


def test_v2_codec_carries_fp16_and_fp64_tensors():
    from apimeta.apis.v2 import decode_response, encode_request

    for dtype, name in ((np.float16, "FP16"), (np.float64, "FP64")):
        arr = np.arange(6, dtype=dtype).reshape(2, 3) / 7
        body, headers = encode_request(arr, True, "in", "out")
        head = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
        assert head["inputs"][0]["datatype"] == name
        assert len(body) - int(headers["Inference-Header-Content-Length"]) == arr.nbytes
    resp = {"outputs": [{"name": "out", "shape": [2, 3], "datatype": "FP16",
                         "parameters": {"binary_data_size": 12}}]}  # fmt: skip
    head = json.dumps(resp).encode()
    raw = (np.arange(6, dtype="<f2") / 4).tobytes()
    shape, dtype, scores = decode_response(head + raw, len(head), "out")
    assert (shape, dtype) == ([2, 3], "FP16") and scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.arange(6) / 4)
