"""build_zoo / load_zoo on tiny synthetic data: manifest, resume, argument checks, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apimeta.apis import BlackBoxAPI, LocalAPI, QueryLedger, build_zoo, load_zoo, read_manifest
from apimeta.apis.local import load_api_model
from apimeta.apis.recipe import split_holdout
from apimeta.apis.zoo import api_classes, api_plan, class_pool_of, zoo_coverage
from apimeta.data import load_dataset
from apimeta.errors import CheckpointError, ConfigError, EpisodeError

DATA = {"n_classes": (8, 3, 3), "per_class": 10}
KW = dict(seed=7, epochs=2, conv4_width=8, resnet_width=0.0625, dataset_options=DATA)

ENTRY_KEYS = {
    "name",
    "file",
    "arch",
    "width",
    "dataset",
    "classes",
    "class_names",
    "channels",
    "image_size",
    "mean",
    "std",
    "holdout_acc",
    "seed",
    "train_time_s",
    "epochs_run",
    "n_params",
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    build_zoo(["synthetic"], 3, ["conv4", "resnet10"], 4, out, **KW)
    return out


def test_manifest_layout(zoo: Path) -> None:
    data = json.loads((zoo / "zoo.json").read_text())
    assert data["version"] == 1
    assert data["build_args"]["archs"] == ["conv4", "resnet10"]
    assert [e["name"] for e in data["apis"]] == ["api-000", "api-001", "api-002"]
    train_classes = set(range(8))  # synthetic: meta-train classes are 0..7
    for i, e in enumerate(data["apis"]):
        assert set(e) == ENTRY_KEYS
        assert (zoo / e["file"]).is_file()
        assert e["arch"] == ("conv4", "resnet10")[i % 2]  # round-robin
        assert len(e["classes"]) == len(set(e["classes"])) == 4
        assert set(e["classes"]) <= train_classes
        assert e["class_names"] == [f"class{c:03d}" for c in e["classes"]]
        assert 0.0 <= e["holdout_acc"] <= 1.0
        assert 1 <= e["epochs_run"] <= 2
        assert e["n_params"] > 0
        assert (e["channels"], e["image_size"]) == (3, 32)
    assert data["apis"][0]["width"] == 8 and data["apis"][1]["width"] == 0.0625
    assert read_manifest(zoo) == data


def test_weights_file_is_best_holdout_copy(zoo: Path) -> None:
    """The stored weights reproduce the stored holdout accuracy (best copy, not last epoch)."""
    entry = read_manifest(zoo)["apis"][0]
    ds = load_dataset("synthetic", **DATA)  # the zoo renders with the default dataset seed
    split = ds.split("train")
    _, _, hx, hy = split_holdout(split.images, split.labels, entry["classes"])
    model = load_api_model(zoo, entry)
    with torch.no_grad():
        acc = (model(hx.float() / 255).argmax(1) == hy).float().mean().item()
    assert acc == pytest.approx(entry["holdout_acc"], abs=1e-6)
    assert set(load_file(str(zoo / entry["file"]))) == set(model.state_dict())


def test_split_holdout_takes_last_20_percent_in_storage_order() -> None:
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).clone()
    labels = torch.tensor([0] * 10 + [1] * 10)
    tx, ty, hx, hy = split_holdout(images, labels, [1, 0])
    assert tx[:, 0, 0, 0].tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 0, 1, 2, 3, 4, 5, 6, 7]
    assert hx[:, 0, 0, 0].tolist() == [18, 19, 8, 9]
    assert ty.tolist() == [0] * 8 + [1] * 8 and hy.tolist() == [0, 0, 1, 1]
    with pytest.raises(EpisodeError, match="only 1 images"):
        split_holdout(images[:11], labels[:11], [1])


def test_resume_reuses_finished_apis(tmp_path: Path) -> None:
    out = tmp_path / "z"
    first = build_zoo(["synthetic"], 2, ["conv4"], 3, out, **KW)
    mtimes = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in first.apis}
    stages: list[tuple[str, int]] = []
    second = build_zoo(
        ["synthetic"],
        3,
        ["conv4"],
        3,
        out,
        **KW,
        progress=lambda p: stages.append((p.stage, p.index)),
    )
    assert second.apis[:2] == first.apis  # same entries, incl. train_time_s
    assert {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in first.apis} == mtimes
    assert ("reused", 0) in stages and ("reused", 1) in stages
    assert ("start", 0) not in stages and ("done", 2) in stages
    assert len(read_manifest(out)["apis"]) == 3

    # a lost weights file is retrained; the others are kept
    (out / "api-001.safetensors").unlink()
    third = build_zoo(["synthetic"], 3, ["conv4"], 3, out, **KW)
    assert (out / "api-001.safetensors").is_file()
    assert third.apis[0] == first.apis[0] and third.apis[2] == second.apis[2]
    assert third.apis[1]["classes"] == first.apis[1]["classes"]


def test_api_identity_depends_only_on_seed_and_index(tmp_path: Path) -> None:
    a = build_zoo(["synthetic"], 1, ["conv4"], 3, tmp_path / "a", **KW)
    b = build_zoo(["synthetic"], 2, ["conv4"], 3, tmp_path / "b", **KW)
    assert a.apis[0]["classes"] == b.apis[0]["classes"]
    assert a.apis[0]["holdout_acc"] == b.apis[0]["holdout_acc"]
    wa = load_file(str(tmp_path / "a" / "api-000.safetensors"))
    wb = load_file(str(tmp_path / "b" / "api-000.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = build_zoo(["synthetic"], 1, ["conv4"], 3, tmp_path / "c", **{**KW, "seed": 8})
    assert c.apis[0]["seed"] != a.apis[0]["seed"]


def test_plan_alternates_datasets_and_covers_arch_combinations() -> None:
    plan = [api_plan(i, ["emoji", "kanji"], ["conv4", "resnet10"], 0)[:2] for i in range(4)]
    assert plan == [
        ("emoji", "conv4"),
        ("kanji", "conv4"),
        ("emoji", "resnet10"),
        ("kanji", "resnet10"),
    ]
    assert len({api_plan(i, ["x"], ["conv4"], 0)[2] for i in range(10)}) == 10


def test_different_args_raise_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "z"
    build_zoo(["synthetic"], 1, ["conv4"], 3, out, **KW)
    with pytest.raises(ConfigError, match=r"different arguments.*way.*--force"):
        build_zoo(["synthetic"], 1, ["conv4"], 4, out, **KW)
    with pytest.raises(ConfigError, match="epochs"):
        build_zoo(["synthetic"], 1, ["conv4"], 3, out, **{**KW, "epochs": 3})
    forced = build_zoo(["synthetic"], 1, ["conv4"], 4, out, **KW, force=True)
    assert len(forced.apis[0]["classes"]) == 4
    assert read_manifest(out)["build_args"]["way"] == 4


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((["nope"], 1, ["conv4"], 3), "unknown dataset"),
        ((["synthetic"], 1, ["vgg"], 3), "unknown architecture"),
        ((["synthetic"], 0, ["conv4"], 3), "n_apis >= 1"),
        ((["synthetic"], 1, ["conv4"], 9), "meta-train classes"),
    ],
)
def test_bad_build_args(tmp_path: Path, args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_zoo(*args, tmp_path / "z", **KW)


def test_class_pool_is_a_seeded_subset() -> None:
    classes = list(range(10, 40))
    assert class_pool_of(classes, None, 0, "emoji").tolist() == classes
    assert class_pool_of(classes, 30, 0, "emoji").tolist() == classes
    pool = class_pool_of(classes, 6, 0, "emoji").tolist()
    assert len(pool) == 6 and set(pool) <= set(classes) and pool == sorted(pool)
    assert class_pool_of(classes, 6, 0, "emoji").tolist() == pool  # the same for every API
    others = {
        tuple(class_pool_of(classes, 6, s, d).tolist()) for s, d in [(1, "emoji"), (0, "kanji")]
    }
    assert tuple(pool) not in others


def test_class_pool_limits_the_classes_apis_draw(tmp_path: Path) -> None:
    out = tmp_path / "z"
    m = build_zoo(["synthetic"], 4, ["conv4"], 2, out, **KW, class_pool=3)
    train = load_dataset("synthetic", **DATA).split("train").classes
    pool = set(class_pool_of(train, 3, KW["seed"], "synthetic").tolist())
    drawn = {c for e in m.apis for c in e["classes"]}
    assert drawn <= pool and len(pool) == 3
    # the draw can be planned without training (benchmarks/zoo_coverage.py)
    tensor_pool = class_pool_of(train, 3, KW["seed"], "synthetic")
    assert [e["classes"] for e in m.apis] == [
        api_classes(tensor_pool, 2, KW["seed"], i) for i in range(4)
    ]
    assert read_manifest(out)["build_args"]["class_pool"] == 3
    with pytest.raises(ConfigError, match="class_pool"):
        build_zoo(["synthetic"], 4, ["conv4"], 2, out, **KW)
    with pytest.raises(ConfigError, match="at least --way"):
        build_zoo(["synthetic"], 1, ["conv4"], 3, tmp_path / "y", **KW, class_pool=2)
    # a zoo built without a pool records none, so zoos from before the option still resume
    plain = build_zoo(["synthetic"], 1, ["conv4"], 2, tmp_path / "p", **KW)
    assert "class_pool" not in plain.build_args


def test_zoo_coverage_counts_apis_per_class() -> None:
    entries = [
        {"dataset": "emoji", "classes": [1, 2, 3]},
        {"dataset": "emoji", "classes": [3, 4, 5]},
        {"dataset": "emoji", "classes": [3, 1, 6]},
        {"dataset": "kanji", "classes": [1, 2]},
    ]
    cov = zoo_coverage(entries)
    assert cov["emoji"] == {
        "apis": 3, "classes": 6, "draws": 9, "min": 1, "mean": 1.5, "max": 3,
        "repeated": pytest.approx(2 / 6),
    }  # fmt: skip
    assert cov["kanji"]["classes"] == 2 and cov["kanji"]["repeated"] == 0


def test_unknown_dataset_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not take option"):
        build_zoo(["synthetic"], 1, ["conv4"], 3, tmp_path / "z", dataset_options={"colour": 1})


def test_load_zoo_returns_working_apis(zoo: Path) -> None:
    ledger = QueryLedger(budget=100)
    apis = load_zoo(zoo, ledger=ledger)
    manifest = read_manifest(zoo)
    assert len(apis) == 3
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for api, entry in zip(apis, manifest["apis"], strict=True):
        assert isinstance(api, LocalAPI) and isinstance(api, BlackBoxAPI)
        assert api.ledger is ledger
        info = api.info
        assert info.name == entry["name"] and info.dataset == "synthetic"
        assert list(info.classes) == entry["classes"] and info.n_classes == 4
        assert info.tags == {"arch": entry["arch"], "holdout_acc": entry["holdout_acc"]}
        assert (info.channels, info.image_size, info.output) == (3, 32, "logits")
        out = api.query(x)
        assert out.shape == (5, 4) and torch.isfinite(out).all()
        # same weights as the file: logits match a direct forward pass
        with torch.no_grad():
            ref = load_api_model(zoo, entry)(x)
        torch.testing.assert_close(out, ref)
    assert ledger.used == 15 and ledger.per_api == {"api-000": 5, "api-001": 5, "api-002": 5}


def test_load_zoo_output_mode_and_errors(zoo: Path, tmp_path: Path) -> None:
    apis = load_zoo(zoo, output="label")
    y = apis[0].query(torch.rand(3, 3, 32, 32))
    assert y.sum(1).tolist() == [1.0, 1.0, 1.0]
    assert all(a.ledger is apis[0].ledger for a in apis)  # shared ledger created once
    with pytest.raises(ConfigError, match="not an API zoo"):
        load_zoo(tmp_path)
    with pytest.raises(ConfigError, match="backend"):
        load_zoo(zoo, backend="tensorflow")
    broken = tmp_path / "broken"
    broken.mkdir()
    data = read_manifest(zoo)
    (broken / "zoo.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="missing"):
        load_zoo(broken)
    (broken / "api-000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_zoo(broken)
    (broken / "zoo.json").write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ConfigError, match="version"):
        read_manifest(broken)


def test_cli_build_and_show(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from apimeta.cli import app

    out = tmp_path / "cz"
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["zoo", "build", "--dataset", "synthetic", "-n", "1", "--archs", "conv4", "--way", "2",
         "--epochs", "1", "--conv4-width", "4", "--out", str(out), "--threads", "1",
         "--batch-size", "8", "--dataset-option", "per_class=10",
         "--dataset-option", "n_classes=[4, 2, 2]"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert read_manifest(out)["build_args"]["dataset_options"] == {
        "per_class": 10,
        "n_classes": [4, 2, 2],
    }
    assert all(c < 4 for c in read_manifest(out)["apis"][0]["classes"])
    assert "api-000" in res.output
    res = runner.invoke(app, ["zoo", "show", str(out)])
    assert res.exit_code == 0 and "api-000" in res.output and "conv4@4" in res.output
    assert "coverage synthetic: 2 classes in 1 APIs, each held by 1-1 APIs" in res.output
    res = runner.invoke(app, ["zoo", "show", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not an" in res.output and "zoo build" in res.output


def test_training_learns_the_task(tmp_path: Path) -> None:
    """A tiny conv4 API beats chance (1/3) by far on synthetic's learnable classes."""
    m = build_zoo(
        ["synthetic"], 1, ["conv4"], 3, tmp_path / "z", seed=1, epochs=8, batch_size=16,
        conv4_width=8, patience=None,
    )  # fmt: skip
    assert m.apis[0]["holdout_acc"] >= 0.8
    assert m.apis[0]["epochs_run"] == 8


def _copy_zoo(zoo: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(zoo, dest)
    return dest


def test_zoo_show_checks_the_weights(zoo: Path, tmp_path: Path) -> None:
    """Deleted or truncated weights used to be reported as a healthy zoo."""
    from typer.testing import CliRunner

    from apimeta.cli import app

    bad = _copy_zoo(zoo, tmp_path / "bad")
    (bad / "api-000.safetensors").unlink()
    data = (bad / "api-001.safetensors").read_bytes()
    (bad / "api-001.safetensors").write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(app, ["zoo", "show", str(bad)])
    assert res.exit_code == 1
    assert "api-000: weights file api-000.safetensors is missing" in res.output
    assert "api-001: weights file api-001.safetensors is unreadable" in res.output
    assert "2 of 3 APIs are damaged" in res.output
    assert CliRunner().invoke(app, ["zoo", "show", str(zoo)]).exit_code == 0


def test_manifest_entries_are_checked_when_the_zoo_is_read(zoo: Path, tmp_path: Path) -> None:
    """A missing key was a KeyError traceback; '../' in a file name loaded a file outside."""
    bad = _copy_zoo(zoo, tmp_path / "z")
    manifest = json.loads((bad / "zoo.json").read_text())
    del manifest["apis"][1]["arch"], manifest["apis"][1]["mean"]
    (bad / "zoo.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"API 1 \('api-001'\) lacks key\(s\) arch, mean"):
        load_zoo(bad)
    manifest = json.loads((zoo / "zoo.json").read_text())
    manifest["apis"][0]["file"] = "../../elsewhere/x.safetensors"
    (bad / "zoo.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="outside the zoo directory"):
        read_manifest(bad)


def test_a_checkpoint_spec_of_a_huge_model_is_refused_without_building_it() -> None:
    from apimeta.models.meta import build_from_spec

    spec = {"name": "resnet10", "num_classes": 5, "in_channels": 3, "image_size": 32,
            "width": 32.0, "bn": "transductive", "adaptive_pool": False, "mean": None,
            "std": None}  # fmt: skip
    with pytest.raises(CheckpointError, match="parameters"):
        build_from_spec(spec)
    assert build_from_spec({**spec, "width": 0.25}) is not None
