from __future__ import annotations

from pathlib import Path

import pytest

import space.zoo as zoo
from search.inputs import StudyError, load_study, parse_study

REPO = Path(__file__).resolve().parents[3]


def test_default_study_is_valid() -> None:
    study = load_study(REPO / "studies" / "default.yaml")
    assert [a.name for a in study.anchors] == [
        "zoo:resnet-s",
        "zoo:resnet-l",
        "zoo:vit-s",
        "zoo:vit-l",
    ]
    assert study.objectives[:2] == ["accuracy", "macs"]
    assert study.directions[:2] == ["maximize", "minimize"]


def test_the_same_architecture_example_names_its_two_resnets_by_id() -> None:
    study = load_study(REPO / "studies" / "same_architecture.yaml")
    assert study.anchor_ids == ["zoo:resnet-s", "resnet-s-seed1"]
    copy = study.anchors[1]
    assert copy.name == "resnet18" and copy.checkpoint == "../runs/zoo-seed1/resnet-s.safetensors"
    # The copy is the zoo's architecture: the same timm kwargs as the zoo records.
    entry = zoo.manifest()["anchors"]["resnet-s"]
    assert entry["timm_name"] == "resnet18"
    assert copy.timm_kwargs == entry["timm_kwargs"]


def test_anchor_mappings_and_aliases(tmp_path) -> None:
    study = parse_study(
        {
            "anchors": [
                "zoo:resnet-s",
                {"name": "resnet18", "checkpoint": "w.pth", "timm_kwargs": {"num_classes": 10}},
            ],
            "objectives": ["acc", "macs", "latency"],
        }
    )
    assert study.objectives == ["accuracy", "macs", "latency_ms"]
    kw = study.anchors[1].load_kwargs(tmp_path)
    assert kw == {"num_classes": 10, "checkpoint": str(tmp_path / "w.pth")}


def test_anchor_ids_default_to_names_and_travel_in_the_load_kwargs(tmp_path) -> None:
    study = parse_study(
        {
            "anchors": [
                {"name": "resnet18", "checkpoint": "a.pth"},
                {"id": "resnet18-b", "name": "resnet18", "checkpoint": "b.pth"},
                {"id": "zoo:resnet-s", "name": "zoo:resnet-s"},
            ],
            "finetune": {"teacher": "resnet18-b"},
        }
    )
    assert study.anchor_ids == ["resnet18", "resnet18-b", "zoo:resnet-s"]
    assert "anchor_id" not in study.anchors[0].load_kwargs(tmp_path)
    assert study.anchors[1].load_kwargs(tmp_path)["anchor_id"] == "resnet18-b"
    assert "anchor_id" not in study.anchors[2].load_kwargs(tmp_path)
    with pytest.raises(StudyError, match="finetune.teacher 'resnet18' is not one"):
        parse_study(
            {
                "anchors": [{"id": "r-a", "name": "resnet18"}, {"id": "r-b", "name": "resnet18"}],
                "finetune": {"teacher": "resnet18"},
            }
        )


def test_a_relative_checkpoint_becomes_absolute(tmp_path, monkeypatch) -> None:
    # Workers rebuild anchors from these arguments in another working directory (Ray Tune's
    # trial folder): "studies/../weights/w.pth" would not be found there.
    monkeypatch.chdir(tmp_path)
    spec = parse_study({"anchors": [{"name": "resnet18", "checkpoint": "../w/x.pth"}, "b"]})
    kw = spec.anchors[0].load_kwargs(Path("studies"))
    assert kw["checkpoint"] == str(tmp_path / "w" / "x.pth")


@pytest.mark.parametrize(
    ("data", "field", "echo"),
    [
        ({"anchors": ["a"]}, "anchors", None),
        ({"anchors": ["a", "b"], "trials": 0}, "trials", "0"),
        ({"anchors": ["a", "b"], "trials": "many"}, "trials", "'many'"),
        ({"anchors": ["a", "b"], "cka": {"threshold": 1.5}}, "cka.threshold", "1.5"),
        ({"anchors": ["a", "b"], "cka": {"treshold": 0.5}}, "cka.treshold", "0.5"),
        ({"anchors": ["a", "b"], "sampler": "cmaes"}, "sampler", "'cmaes'"),
        ({"anchors": ["a", "b"], "objectives": ["accuracy"]}, "objectives", None),
        (
            {"anchors": ["a", "b"], "objectives": ["accuracy", "macs", "flops"]},
            "objectives",
            "flops",
        ),
        ({"anchors": ["a", "a"]}, "anchors[1].name", "give each an id of its own"),
        ({"anchors": ["a", {"name": "b", "id": "a"}]}, "anchors[1].id", "'a' is the id of"),
        ({"anchors": ["a", {"name": "b", "id": "b/c"}]}, "anchors[1].id", "'b/c'"),
        (
            {"anchors": ["a", {"name": "b", "checkpoint": "x", "pretrained": True}]},
            "anchors[1]",
            None,
        ),
        ({"anchors": ["a", "b"], "data": {"validation": -5}}, "data.validation", "-5"),
        ({"anchors": ["a", "b"], "data": {"dataset": "cifar"}}, "data.dataset", "'cifar'"),
        ({"anchors": ["a", "b"], "workerz": 2}, "workerz", "2"),
    ],
)
def test_bad_fields_are_named(data, field, echo) -> None:
    with pytest.raises(StudyError) as e:
        parse_study(data, source="s.yaml")
    msg = str(e.value)
    assert msg.startswith("s.yaml: field ")
    assert f"'{field}'" in msg
    assert "\n" not in msg
    if echo is not None:
        assert echo in msg


def test_unknown_field_lists_known_ones() -> None:
    with pytest.raises(StudyError, match=r"unknown field; known fields: images, threshold, top_k"):
        parse_study({"anchors": ["a", "b"], "cka": {"treshold": 0.5}})


def test_file_errors(tmp_path) -> None:
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("anchors: [a, b\ntrials: 3\n")
    with pytest.raises(StudyError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_study(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(StudyError, match="must be a YAML mapping"):
        load_study(lst)


def test_the_family_section_defaults_and_label_free_rules() -> None:
    study = load_study(REPO / "studies" / "default.yaml")
    assert study.family.enabled and study.family.members == "auto"
    assert study.family.epochs == 5 and study.family.distill == 0.5
    label_free = {
        "anchors": ["zoo:resnet-s", "zoo:resnet-l"],
        "data": {"dataset": "images", "root": "imgs"},
        "family": {"enabled": True},
    }
    parsed = parse_study(label_free)
    assert parsed.family.distill == 1.0  # no labels: pure distillation
    with pytest.raises(StudyError, match=r"field 'family.distill': family.distill is 0.5"):
        parse_study({**label_free, "family": {"enabled": True, "distill": 0.5}})
    with pytest.raises(StudyError, match="family.teacher 'zoo:resnet-l' differs"):
        parse_study(
            {
                **label_free,
                "data": {**label_free["data"], "teacher": "zoo:resnet-s"},
                "family": {"teacher": "zoo:resnet-l"},
            }
        )
    assert (
        parse_study(
            {
                **label_free,
                "data": {**label_free["data"], "teacher": None},
                "family": {"teacher": "zoo:resnet-s"},
            }
        ).teacher
        == "zoo:resnet-s"
    )
