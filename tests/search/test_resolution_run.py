"""``python -m search.run`` with input resolution as a search dimension (issue 14, item 2).

The tiny study (a ResNet and a ViT, both native at 32 px) searched at 40 and 48 px: both
resolutions are evaluated, recorded in trials and exports, and the exports rebuild, check
and convert to ONNX at their recorded resolution.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evaluators import LatencyTable, count_macs
from search.core import SearchSpace, candidate_of, evaluated_trials
from search.export import main as export_main
from search.inputs import check_table, load_anchors, load_study, parse_study
from search.profile import main as profile_main
from search.run import main
from search.store import open_study
from space import InputError, read_export

DATA = Path(__file__).resolve().parent / "data"
STUDY = DATA / "tiny_study.yaml"
RESOLUTIONS = (40, 48)

DEVICES = """device,max_macs
mid,60M
big,
"""


def _study_with_resolutions(root: Path) -> Path:
    definition = yaml.safe_load(STUDY.read_text())
    definition["resolutions"] = list(RESOLUTIONS)
    definition["finetune"] = {
        "enabled": True,
        "steps": 8,
        "batch_size": 32,
        "lr": 0.01,
        "max_trials": 2,
        "promote": {"per_device": 1, "front": False},
    }
    path = root / "res_study.yaml"
    path.write_text(yaml.safe_dump(definition))
    return path


def _load(out: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{(out / 'study.db').resolve()}")


@pytest.fixture(scope="module")
def res_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("res_run")
    devices = root / "devices.csv"
    devices.write_text(DEVICES)
    study = _study_with_resolutions(root)
    out = root / "out"
    rc = main(["--budget-table", str(devices), "--study", str(study), "--out", str(out)])
    return {"rc": rc, "out": out, "root": root, "study": study}


@pytest.mark.slow  # one real search of 2 minutes on 2 cores
def test_both_resolutions_are_evaluated_and_recorded(res_run) -> None:
    assert res_run["rc"] == 0
    study = _load(res_run["out"])
    done = evaluated_trials(study)
    assert len(done) == 8
    assert {t.params["resolution"] for t in done} == set(RESOLUTIONS)
    for t in done:
        c = candidate_of(t)
        assert c.resolution == t.params["resolution"] == t.user_attrs["resolution"]
        assert t.user_attrs["key"] == c.key and f"{c.resolution}px" in c.key
    keys = [t.user_attrs["key"] for t in done]
    assert len(set(keys)) == len(keys)
    # Every anchor is evaluated at each resolution, its MACs growing with the pixels.
    anchors = [t for t in done if t.user_attrs["kind"] == "anchor"]
    assert len(anchors) == 2 * len(RESOLUTIONS)
    by = {(candidate_of(t).front, candidate_of(t).resolution): t.user_attrs for t in anchors}
    for name in {n for n, _ in by}:
        assert by[(name, 48)]["macs"] > 1.1 * by[(name, 40)]["macs"]
    # The pruning rule ran per pair and resolution.
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert {candidate_of(t).resolution for t in pruned} == set(RESOLUTIONS)


@pytest.mark.slow  # one real search of 2 minutes on 2 cores
def test_rung1_fine_tunes_at_the_rung0_resolution(res_run) -> None:
    rung0 = {t.number: t for t in evaluated_trials(_load(res_run["out"]))}
    tuned = evaluated_trials(_load(res_run["out"], "tiny:finetuned"))
    assert tuned, "rung 1 fine-tuned nothing"
    for t in tuned:
        source = rung0[t.user_attrs["rung0_trial"]]
        assert candidate_of(t) == candidate_of(source)
        assert t.params["resolution"] == source.params["resolution"] == t.user_attrs["resolution"]
        assert t.user_attrs["macs"] == source.user_attrs["macs"]


@pytest.mark.slow  # one real search of 2 minutes on 2 cores
def test_exports_rebuild_check_and_convert_at_their_resolution(res_run, tmp_path) -> None:
    exports = sorted((res_run["out"] / "exports").glob("*.json"))
    assert [p.stem for p in exports] == ["big", "mid"]
    for path in exports:
        doc = json.loads(path.read_text())
        r = doc["candidate"]["resolution"]
        assert r in RESOLUTIONS
        assert f"@{r}px" in doc["label"]
        loaded = read_export(path)
        assert loaded.input_size == (3, r, r)
        assert count_macs(loaded.model, (3, r, r)) == doc["metrics"]["macs"]
        # --check re-measures test and validation accuracy, MACs and params at it.
        assert export_main(["--check", str(path)]) == 0
        onnx_path = tmp_path / f"{path.stem}.onnx"
        assert export_main([str(path), "--onnx", str(onnx_path)]) == 0
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[1:] == [3, r, r]


def test_a_native_latency_table_does_not_cover_the_resolutions(
    tiny_table, tmp_path, capsys
) -> None:
    study = _study_with_resolutions(tmp_path)
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "dev.json").write_text(Path(tiny_table).read_text())
    devices = tmp_path / "devices.csv"
    devices.write_text("device,max_latency_ms,latency_table\ndev,5,tables/dev.json\n")
    out = tmp_path / "out"
    rc = main(["--budget-table", str(devices), "--study", str(study), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "at the study's resolution 40 px" in err[0], err[0]
    assert "python -m search.profile" in err[0]
    assert not out.exists()


def test_a_table_profiled_for_the_study_covers_each_resolution(tmp_path) -> None:
    study_path = _study_with_resolutions(tmp_path)
    out = tmp_path / "dev.json"
    argv = ["--study", str(study_path), "--device", "dev", "--out", str(out)]
    argv += ["--runtimes", "torch", "--rounds", "2", "--warmup", "1", "--calibration", "2"]
    assert profile_main([*argv, "--threads", "1"]) == 0
    table = LatencyTable.read(out)
    anchors, _ = load_anchors(load_study(study_path), study_path)
    depths = {n: a.num_blocks for n, a in anchors.items()}
    assert table.missing_parts(SearchSpace(depths, RESOLUTIONS).all_candidates()) == []
    assert table.missing_parts(SearchSpace(depths).all_candidates()) != []
    assert (
        check_table(
            table,
            device="dev",
            study_name="tiny",
            anchors=anchors,
            candidates=SearchSpace(depths, RESOLUTIONS).all_candidates(),
        )
        is None
    )


def test_a_stored_study_keeps_its_resolutions() -> None:
    definition = yaml.safe_load(STUDY.read_text())
    native = parse_study(definition)
    searched = parse_study({**definition, "resolutions": list(RESOLUTIONS)})
    storage = optuna.storages.InMemoryStorage()
    _, created = open_study(storage, native, "d1")
    assert created
    assert open_study(storage, native, "d2")[1] is False
    with pytest.raises(InputError, match=r"searches resolutions None .* not \[40, 48\]"):
        open_study(storage, searched, "d3")
