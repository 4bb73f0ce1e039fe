"""Two checkpoints of one architecture in one study (issue 25), through ``search.run`` end to end.

Two ``resnet10t`` anchors, told apart by their ids (``r10-a``, ``r10-b``): the seeded
initialisation and a differently seeded copy, saved as ``.safetensors`` and loaded from
the study's ``checkpoint`` paths. The search stitches them both ways; each device's pick is
exported with both anchors' ids, timm name and checkpoint SHA-256, and rebuilds through
``load_export``, ``search.export --check`` and ``search.export --onnx``.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from safetensors.torch import save_file

from evaluators import count_macs
from search.core import evaluated_trials
from search.export import main as export_main
from search.run import main
from space import Candidate, file_sha256, load_anchor, read_export

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
KWARGS = {"num_classes": 4}
IDS = ("r10-a", "r10-b")


def _checkpoint(path: Path, seed: int) -> Path:
    anchor = load_anchor("resnet10t", seed=seed, **KWARGS)
    save_file({k: v.contiguous() for k, v in anchor.model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def ids_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("ids")
    definition = yaml.safe_load(STUDY.read_text())
    definition.update(
        name="ids",
        trials=12,
        anchors=[
            {
                "id": anchor_id,
                "name": "resnet10t",
                "checkpoint": _checkpoint(root / f"{anchor_id}.safetensors", seed).name,
                "timm_kwargs": KWARGS,
                "input_size": [3, 32, 32],
            }
            for anchor_id, seed in zip(IDS, (0, 1), strict=True)
        ],
        cka={"images": 64, "threshold": 0.0, "top_k": 1},
    )
    study = root / "ids.yaml"
    study.write_text(yaml.safe_dump(definition))
    # "lean" holds less than an anchor: its pick is a stitch that skips blocks.
    macs = count_macs(load_anchor("resnet10t", **KWARGS).model, (3, 32, 32))
    devices = root / "devices.csv"
    devices.write_text(f"device,max_macs\nlean,{macs - 1}\nany,\n")
    out = root / "out"
    argv = ["--budget-table", str(devices), "--study", str(study), "--out", str(out), "--onnx"]
    return {"rc": main(argv), "out": out, "root": root}


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    return evaluated_trials(optuna.load_study(study_name="ids", storage=storage))


def test_the_search_stitches_the_two_checkpoints_both_ways(ids_run) -> None:
    assert ids_run["rc"] == 0
    done = [Candidate.from_dict(t.user_attrs["config"]) for t in _trials(ids_run["out"])]
    anchors = {c.front for c in done if c.is_anchor}
    assert anchors == set(IDS)
    orders = {(c.front, c.back) for c in done if not c.is_anchor}
    assert orders == {("r10-a", "r10-b"), ("r10-b", "r10-a")}
    keys = {t.user_attrs["key"] for t in _trials(ids_run["out"])}
    assert {"anchor|r10-a", "anchor|r10-b"} <= keys
    report = (ids_run["out"] / "report.html").read_text()
    assert all(anchor_id in report for anchor_id in IDS)


def test_exports_record_ids_and_rebuild_check_and_convert(ids_run) -> None:
    out, root = ids_run["out"], ids_run["root"]
    lean = json.loads((out / "exports" / "lean.json").read_text())
    assert lean["candidate"]["kind"] == "stitch"
    pair = {lean["candidate"]["front"], lean["candidate"]["back"]}
    assert pair == set(IDS)
    for name in ("lean", "any"):
        path = out / "exports" / f"{name}.json"
        doc = json.loads(path.read_text())
        for rec in doc["anchors"]:
            assert rec["id"] in IDS and rec["name"] == "resnet10t"
            assert rec["checkpoint_sha256"] == file_sha256(root / f"{rec['id']}.safetensors")
        loaded = read_export(path)
        assert {a.name for a in loaded.anchors.values()} <= set(IDS)
        assert {a.model_name for a in loaded.anchors.values()} == {"resnet10t"}
        assert (out / "exports" / f"{name}.onnx").is_file()  # search.run --onnx
        assert export_main(["--check", str(path)]) == 0
        onnx = root / f"{name}-again.onnx"
        assert export_main([str(path), "--onnx", str(onnx)]) == 0
        assert onnx.stat().st_size > 0
