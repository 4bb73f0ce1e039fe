"""Bad input: one clear line on stderr naming the file or field, exit 2, nothing written.

Every case runs ``search.run``'s ``main`` (or ``search.export``'s, for cases whose argv
starts with ``search.export``) in-process on otherwise valid inputs (the tiny study, a valid
budget table, real exports); the cases cover flags, budget tables, study YAML, checkpoints,
data, storages (PostgreSQL on 127.0.0.1:5432 for the server cases) and hostile or damaged
files. One more test checks the same through a real subprocess.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch

from search.export import main as export_main
from search.run import main
from tests.evaluators.test_images import write_pngs
from tests.space.test_export import build_exports, copy_export

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
RESNET_LINE = "    timm_kwargs: {num_classes: 4}\n"


class _Evil:
    """Pickles as a call that would create a file: loading it must not execute that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@dataclass
class Inputs:
    """A folder of valid inputs the cases spoil one at a time."""

    root: Path
    devices: Path
    marker: Path
    factory: pytest.TempPathFactory

    def export(self, key: str = "cnn_vit") -> Path:
        """A copy of a real export (its JSON and weight files) under the case's folder."""
        return copy_export(build_exports(self.factory)[key][0], self.root / "export")

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    def study(self, name: str, old: str, new: str) -> Path:
        text = STUDY.read_text()
        assert old in text, old
        return self.write(name, text.replace(old, new, 1))

    def checkpoint_study(self, name: str, checkpoint: Path) -> Path:
        return self.study(name, RESNET_LINE, f"    checkpoint: {checkpoint}\n{RESNET_LINE}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    from space import load_anchor

    resnet = load_anchor("resnet10t", num_classes=4, input_size=(3, 32, 32))
    vit = load_anchor(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=48,
        num_heads=3,
        num_classes=4,
    )
    return {"resnet": resnet.model.state_dict(), "vit": vit.model.state_dict()}


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# Each case: (inputs, weights) -> (argv after the defaults, text the error line must hold).
Case = Callable[[Inputs, dict], tuple[list[str], str]]


def _flags(*argv: str, needle: str) -> Case:
    return lambda x, w: (["--budget-table", str(x.devices), *argv], needle)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens there once closed


def _table(text: str | bytes, needle: str) -> Case:
    def case(x: Inputs, w: dict) -> tuple[list[str], str]:
        return ["--budget-table", str(x.write("bad.csv", text))], needle

    return case


def _yaml(old: str, new: str, needle: str) -> Case:
    def case(x: Inputs, w: dict) -> tuple[list[str], str]:
        path = x.study("s.yaml", old, new)
        return ["--budget-table", str(x.devices), "--study", str(path)], needle

    return case


def _checkpoint(make: Callable[[Inputs, dict], Path], needle: str) -> Case:
    def case(x: Inputs, w: dict) -> tuple[list[str], str]:
        path = x.checkpoint_study("ck.yaml", make(x, w))
        return ["--budget-table", str(x.devices), "--study", str(path)], needle

    return case


def _truncated(x: Inputs, w: dict) -> Path:
    path = _save(x.root / "trunc.safetensors", w["resnet"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _pickled_code(x: Inputs, w: dict) -> Path:
    path = x.root / "evil.pth"
    torch.save({"state_dict": {"conv": torch.zeros(1)}, "payload": _Evil(x.marker)}, path)
    return path


def _not_torch(x: Inputs, w: dict) -> Path:
    return x.write("garbage.pth", "this is not a checkpoint\n")


def _empty_imagefolder(x: Inputs, w: dict) -> Path:
    for split in ("train/a", "train/b", "val/a", "val/b"):
        (x.root / "imgs" / split).mkdir(parents=True, exist_ok=True)
    return x.root / "imgs"


def _imagefolder(make: Callable[[Inputs, dict], Path] | None, needle: str) -> Case:
    def case(x: Inputs, w: dict) -> tuple[list[str], str]:
        root = make(x, w) if make else x.root / "missing-images"
        path = x.study("img.yaml", "dataset: synthetic", f"dataset: imagefolder\n  root: {root}")
        return ["--budget-table", str(x.devices), "--study", str(path)], needle

    return case


def _image_files(x: Inputs, *, corrupt: bool) -> Path:
    root = x.root / "photos"
    if corrupt:
        write_pngs(root, 3)
        (root / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    else:
        root.mkdir()
        (root / "notes.txt").write_text("no pictures")
    return root


def _images(make: Callable[[Inputs], Path] | None, needle: str, teacher: str = "resnet10t") -> Case:
    """A label-free study (images data) on the folder ``make`` gives."""

    def case(x: Inputs, w: dict) -> tuple[list[str], str]:
        root = make(x) if make else x.root / "photos"
        text = STUDY.read_text().replace(
            "dataset: synthetic", f"dataset: images\n  root: {root}\n  teacher: {teacher}", 1
        )
        path = x.write("lf.yaml", text.replace("[accuracy, macs]", "[agreement, macs]", 1))
        return ["--budget-table", str(x.devices), "--study", str(path)], needle

    return case


PG = os.environ.get("STITCHSEARCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_HOST = PG.split("@", 1)[1].rsplit("/", 1)[0]
SECRET = "Hunter2-secret"


def _storage(make: Callable[[Inputs], str], needle: str) -> Case:
    def case(x: Inputs, w: dict) -> tuple[list[str], str]:
        url = make(x)
        return ["--budget-table", str(x.devices), "--study", str(STUDY), "--storage", url], needle

    return case


def _sqlite_file(content: Callable[[Path], None]) -> Callable[[Inputs], str]:
    def make(x: Inputs) -> str:
        path = x.root / "study.db"
        content(path)
        return f"sqlite:///{path}"

    return make


def _other_program(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER, name TEXT)")


def _optuna_db(path: Path) -> None:
    optuna.create_study(storage=f"sqlite:///{path}", study_name="other")
    optuna.storages.RDBStorage(f"sqlite:///{path}").engine.dispose()


def _truncated_db(path: Path) -> None:
    _optuna_db(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _schema_of(version: str, revision: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        _optuna_db(path)
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))
            conn.execute("UPDATE version_info SET library_version = ?", (version,))

    return make


def _export(edit: Callable[[Path], None], needle: str, key: str = "cnn_vit") -> Case:
    """``search.export --check`` on a copy of a real export, spoiled by ``edit``."""

    def case(x: Inputs, w: dict) -> tuple[list[str], str]:
        path = x.export(key)
        edit(path)
        return ["search.export", "--check", str(path)], needle

    return case


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def _weights_file(path: Path) -> Path:
    return path.parent / _manifest(path)["stitch"]["weights"]


def _swap_weights(path: Path) -> None:
    """Replaces the stitch's weights by another valid safetensors file (hash mismatch)."""
    from safetensors.torch import load_file, save_file

    weights = _weights_file(path)
    state = {k: v + 1 for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))


def _point_checkpoint(spoil: Callable[[Path, Path], None]) -> Callable[[Path], None]:
    """Points the export's front anchor at a copy of its checkpoint spoiled by ``spoil``."""

    def edit(path: Path) -> None:
        doc = _manifest(path)
        front = doc["anchors"][0]
        copy = path.parent / ("spoiled" + Path(front["checkpoint"]).suffix)
        shutil.copy(front["checkpoint"], copy)
        spoil(copy, path.parent.parent / "pwned")
        front["checkpoint"] = str(copy)
        path.write_text(json.dumps(doc))

    return edit


def _yaml_file(text: str) -> Case:
    def case(x: Inputs, w: dict) -> tuple[list[str], str]:
        return ["--budget-table", str(x.devices), "--study", str(x.write("h.yaml", text))], ""

    return case


_BOMB = "name: bomb\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True)
)


def _big_csv(x: Inputs, w: dict) -> tuple[list[str], str]:
    path = x.root / "big.csv"
    with open(path, "w") as f:
        f.write("device,max_macs\n")
        row = "edge,1M\n" * 100_000
        while f.tell() < 100 * 2**20:
            f.write(row)
    return ["--budget-table", str(path)], "big.csv: the file is 100."


CASES: dict[str, Case] = {
    # command-line flags
    "no-flags": lambda x, w: ([], "--budget-table"),
    "unknown-flag": _flags("--frobnicate", needle="--frobnicate"),
    "trials-zero": _flags("--trials", "0", needle="--trials must be >= 1"),
    "workers-word": _flags("--workers", "two", needle="--workers must be a whole number"),
    "seed-word": _flags("--seed", "x", needle="--seed"),
    "storage-not-url": _flags("--study", str(STUDY), "--storage", "nonsense", needle="--storage"),
    "storage-mongodb": _flags(
        "--study", str(STUDY), "--storage", "mongodb://x/y", needle="'mongodb'"
    ),
    "storage-no-folder": _flags(
        "--study", str(STUDY), "--storage", "sqlite:////no/such/dir/s.db", needle="/no/such/dir"
    ),
    "out-is-a-file": lambda x, w: (
        ["--budget-table", str(x.devices), "--study", str(STUDY), "--out", str(x.devices)],
        "--out",
    ),
    "ray-address": _flags(
        "--study", str(STUDY), "--ray-address", "not an address", needle="--ray-address"
    ),
    "ray-address-nobody-there": lambda x, w: _flags(
        "--study",
        str(STUDY),
        "--ray-address",
        f"127.0.0.1:{_closed_port()}",
        needle="--ray-address: no Ray cluster answers",
    )(x, w),
    # the budget table
    "csv-missing": lambda x, w: (["--budget-table", str(x.root / "none.csv")], "none.csv"),
    "csv-is-folder": lambda x, w: (["--budget-table", str(x.root)], "is a directory"),
    "csv-empty": _table("", "bad.csv: the file is empty"),
    "csv-bad-number": _table("device,max_macs\nsmall,ten\n", "bad.csv:2: column 'max_macs'"),
    "csv-unknown-column": _table("device,max_macz\nsmall,10M\n", "'max_macz'"),
    "csv-duplicate-device": _table("device,max_macs\na,1M\na,2M\n", "bad.csv:3: column 'device'"),
    "csv-not-utf8": _table(b"device,max_macs\n\xff,1M\n", "bad.csv:2: not valid UTF-8"),
    "csv-quantile-above-1": _table(
        "device,max_latency_ms,latency_table,latency_quantile\na,3,t.json,1.5\n",
        "bad.csv:2: column 'latency_quantile': must be between 0 and 1 (exclusive) (got '1.5')",
    ),
    "csv-quantile-zero": _table(
        "device,max_latency_ms,latency_table,latency_quantile\na,3,t.json,0\n",
        "column 'latency_quantile': must be between 0 and 1 (exclusive) (got '0')",
    ),
    "csv-quantile-without-table": _table(
        "device,max_latency_ms,latency_table,latency_quantile\na,3,,0.9\n",
        "this row has no latency_table (got '0.9')",
    ),
    # the study YAML
    "yaml-missing": lambda x, w: (
        ["--budget-table", str(x.devices), "--study", str(x.root / "x.yaml")],
        "x.yaml",
    ),
    "yaml-syntax": _yaml("objectives: [accuracy, macs]", "objectives: [accuracy, macs", "s.yaml:"),
    "yaml-negative-trials": _yaml("trials: 8", "trials: -3", "field 'trials'"),
    "yaml-self-stitch": _yaml(
        "trials: 8", "trials: 8\nself_stitch: true", "field 'self_stitch': stitching an anchor"
    ),
    "yaml-unknown-field": _yaml("seed: 0", "seed: 0\nsead: 1", "field 'sead': unknown field"),
    "yaml-unknown-objective": _yaml(
        "objectives: [accuracy, macs]", "objectives: [accuracy, flops]", "field 'objectives'"
    ),
    "yaml-zero-timeout": _yaml("trial_timeout_s: 120", "trial_timeout_s: 0", "trial_timeout_s"),
    "yaml-unknown-model": _yaml("resnet10t", "resnet10x", "resnet10x"),
    "yaml-pruning-signal": _yaml(
        "trial_timeout_s: 120", "trial_timeout_s: 120\npruning: {signal: naswot}", "pruning.signal"
    ),
    "yaml-pruning-depth-zero": _yaml(
        "trial_timeout_s: 120", "trial_timeout_s: 120\npruning: {depth: 0}", "pruning.depth"
    ),
    "yaml-pruning-and-old-cka-rule": _yaml(
        "trial_timeout_s: 120", "trial_timeout_s: 120\npruning: {signal: kl}", "cka.threshold"
    ),
    # input resolutions (issue 14, item 2): the tiny ViT has 8-px patches
    "yaml-resolution-zero": _yaml("seed: 0", "seed: 0\nresolutions: [32, 0]", "'resolutions[1]'"),
    "yaml-resolution-negative": _yaml("seed: 0", "seed: 0\nresolutions: [-32]", "'resolutions[0]'"),
    "yaml-resolution-float": _yaml("seed: 0", "seed: 0\nresolutions: [40.5]", "'resolutions[0]'"),
    "yaml-resolution-string": _yaml(
        "seed: 0", "seed: 0\nresolutions: ['48']", "field 'resolutions[0]'"
    ),
    "yaml-resolution-not-list": _yaml("seed: 0", "seed: 0\nresolutions: 48", "'resolutions'"),
    "yaml-resolution-empty": _yaml("seed: 0", "seed: 0\nresolutions: []", "'resolutions'"),
    # operators MAC counting may skip (issue 26, item 5a)
    "yaml-macs-allow-not-list": _yaml(
        "seed: 0",
        "seed: 0\nmacs: {allow_unsupported: aten::linalg_vector_norm}",
        "field 'macs.allow_unsupported': Input should be a valid list",
    ),
    "yaml-macs-allow-number": _yaml(
        "seed: 0",
        "seed: 0\nmacs: {allow_unsupported: [3]}",
        "field 'macs.allow_unsupported[0]': Input should be a valid string (got 3)",
    ),
    "yaml-macs-allow-empty-string": _yaml(
        "seed: 0",
        "seed: 0\nmacs: {allow_unsupported: ['']}",
        "field 'macs.allow_unsupported': item 0 '' is not an operator name",
    ),
    "yaml-macs-allow-bare-name": _yaml(
        "seed: 0",
        "seed: 0\nmacs: {allow_unsupported: [linalg_vector_norm]}",
        "item 0 'linalg_vector_norm' is not an operator name; give TorchScript names such as",
    ),
    "yaml-macs-allow-twice": _yaml(
        "seed: 0",
        "seed: 0\nmacs: {allow_unsupported: [aten::ceil, aten::ceil]}",
        "field 'macs.allow_unsupported': lists ['aten::ceil'] twice",
    ),
    "yaml-macs-unknown-field": _yaml(
        "seed: 0", "seed: 0\nmacs: {allow: [aten::ceil]}", "field 'macs.allow': unknown field"
    ),
    # the family (issue 23): one line naming the field, exit 2
    "yaml-family-anchors": _yaml(
        "seed: 0", "seed: 0\nfamily: {enabled: true, anchors: melted}", "field 'family.anchors'"
    ),
    "yaml-family-epochs-zero": _yaml(
        "seed: 0", "seed: 0\nfamily: {enabled: true, epochs: 0}", "field 'family.epochs'"
    ),
    "yaml-family-lr": _yaml("seed: 0", "seed: 0\nfamily: {lr: 5}", "field 'family.lr'"),
    "yaml-family-sampling": _yaml(
        "seed: 0", "seed: 0\nfamily: {sampling: flops}", "field 'family.sampling'"
    ),
    "yaml-family-anchor-share": _yaml(
        "seed: 0", "seed: 0\nfamily: {anchor_share: 1.5}", "field 'family.anchor_share'"
    ),
    "yaml-family-members-empty": _yaml(
        "seed: 0", "seed: 0\nfamily: {members: []}", "field 'family.members': lists no member"
    ),
    "yaml-family-members-twice": _yaml(
        "seed: 0",
        "seed: 0\nfamily: {members: [resnet10t, resnet10t]}",
        "field 'family.members': lists ['resnet10t'] twice",
    ),
    "yaml-family-member-unknown": _yaml(
        "seed: 0",
        "seed: 0\nfamily: {enabled: true, members: ['resnet10t[:9] -> vit_tiny_patch16_224[1:]']}",
        "field 'family.members[0]'",
    ),
    "yaml-family-teacher": _yaml(
        "seed: 0", "seed: 0\nfamily: {teacher: resnet50}", "field 'family.teacher'"
    ),
    "yaml-family-train-images": _yaml(
        "seed: 0",
        "seed: 0\nfamily: {enabled: true, train_images: 100000}",
        "field 'family.train_images'",
    ),
    "yaml-family-with-resolutions": _yaml(
        "seed: 0", "seed: 0\nresolutions: [32]\nfamily: {enabled: true}", "family.enabled"
    ),
    "yaml-resolution-twice": _yaml(
        "seed: 0", "seed: 0\nresolutions: [48, 48]", "field 'resolutions': lists [48] twice"
    ),
    "yaml-resolution-below-patch": _yaml(
        "seed: 0", "seed: 0\nresolutions: [32, 4]", "'resolutions[1]': anchor 'vit_tiny"
    ),
    "yaml-resolution-not-patch-multiple": _yaml(
        "seed: 0", "seed: 0\nresolutions: [44]", "not a multiple of the patch size 8"
    ),
    # stitch points restricted to stage boundaries (issue 14, item 5)
    "yaml-cuts-unknown": _yaml(
        "seed: 0", "seed: 0\ncuts: blocks", "field 'cuts': Input should be 'all' or 'stages'"
    ),
    "yaml-cuts-stages-without-stages": _yaml(
        "seed: 0",
        "seed: 0\ncuts: stages",
        "field 'cuts': anchor 'vit_tiny_patch16_224' (vit) has no stages",
    ),
    # anchor ids (issue 25): two checkpoints of one architecture need ids of their own
    "yaml-anchor-id-twice": _yaml(
        "  - name: vit_tiny_patch16_224\n",
        "  - id: resnet10t\n    name: vit_tiny_patch16_224\n",
        "field 'anchors[1].id': anchors[1].id 'resnet10t' is the id of anchors[0] too; give "
        "each anchor an id of its own",
    ),
    "yaml-anchor-name-twice": _yaml(
        "data:\n",
        "  - name: resnet10t\n    timm_kwargs: {num_classes: 4}\ndata:\n",
        "field 'anchors[2].name': anchors[2].name 'resnet10t' is listed twice (anchors[0] too); "
        "to stitch two checkpoints of one architecture, give each an id of its own: {id: "
        "resnet10t-b, name: resnet10t, checkpoint: ...}",
    ),
    "yaml-anchor-id-empty": _yaml(
        "  - name: resnet10t\n",
        "  - name: resnet10t\n    id: ''\n",
        "field 'anchors[0].id': must be a non-empty string",
    ),
    "yaml-anchor-id-path": _yaml(
        "  - name: resnet10t\n",
        "  - name: resnet10t\n    id: runs/r10\n",
        "field 'anchors[0].id': 'runs/r10' is not a valid anchor id; use up to 64 letters",
    ),
    "yaml-anchor-id-backslash": _yaml(
        "  - name: resnet10t\n",
        "  - name: resnet10t\n    id: 'C:\\r10'\n",
        "field 'anchors[0].id': 'C:\\\\r10' is not a valid anchor id",
    ),
    # checkpoints
    "ckpt-missing": _checkpoint(lambda x, w: x.root / "nope.safetensors", "nope.safetensors"),
    "ckpt-truncated": _checkpoint(_truncated, "trunc.safetensors"),
    "ckpt-wrong-architecture": _checkpoint(
        lambda x, w: _save(x.root / "vit.safetensors", w["vit"]), "does not fit model"
    ),
    "ckpt-pickled-code": _checkpoint(_pickled_code, "evil.pth' was refused"),
    "ckpt-not-a-checkpoint": _checkpoint(_not_torch, "garbage.pth"),
    # dataset paths
    "fashion-mnist-missing-root": _yaml(
        "dataset: synthetic", "dataset: fashion-mnist\n  root: /nonexistent/fm", "/nonexistent/fm"
    ),
    "imagefolder-no-root": _yaml("dataset: synthetic", "dataset: imagefolder", "data.root"),
    "imagefolder-missing": _imagefolder(None, "missing-images"),
    "imagefolder-no-images": _imagefolder(_empty_imagefolder, "has no images"),
    # label-free studies (a folder of unlabelled images)
    "images-no-images": _images(lambda x: _image_files(x, corrupt=False), "has no images"),
    "images-unreadable-file": _images(
        lambda x: _image_files(x, corrupt=True), "sub/corrupt.png' cannot be read"
    ),
    "images-teacher-not-an-anchor": _images(
        lambda x: _image_files(x, corrupt=False),
        "field 'data.teacher': data.teacher 'resnet99'",
        teacher="resnet99",
    ),
    "images-accuracy-objective": _yaml(
        "dataset: synthetic",
        "dataset: images\n  root: photos",
        "field 'objectives': objective 'accuracy'",
    ),
    # storages at start-up (PostgreSQL: the server on 127.0.0.1:5432; the password is
    # never printed)
    "pg-unknown-role": _storage(
        lambda x: f"postgresql+psycopg://nobody_here:{SECRET}@{PG_HOST}/postgres",
        'role "nobody_here" does not exist',
    ),
    "pg-missing-database": _storage(
        lambda x: f"postgresql+psycopg://postgres:{SECRET}@{PG_HOST}/no_such_db_here",
        "createdb",
    ),
    "pg-server-down": _storage(
        lambda x: f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{_closed_port()}/db",
        "start the server at 127.0.0.1:",
    ),
    "pg-driver-missing": _storage(
        lambda x: f"postgresql+pg8000://postgres:{SECRET}@{PG_HOST}/db", "not installed"
    ),
    "pg-bad-port": _storage(
        lambda x: f"postgresql+psycopg://postgres:{SECRET}@{PG_HOST}x/db", "not a database URL"
    ),
    "sqlite-unwritable-folder": _storage(lambda x: "sqlite:////proc/study.db", "'/proc'"),
    "sqlite-is-a-folder": _storage(lambda x: f"sqlite:///{x.root}", "is a folder"),
    "sqlite-garbage": _storage(
        _sqlite_file(lambda p: p.write_bytes(os.urandom(8192))), "not a readable SQLite"
    ),
    "sqlite-truncated-study": _storage(_sqlite_file(_truncated_db), "study.db"),
    "sqlite-other-program": _storage(
        _sqlite_file(_other_program), "another program's tables (users)"
    ),
    "sqlite-old-optuna-schema": _storage(
        _sqlite_file(_schema_of("3.0.0", "v3.0.0.a")), "optuna storage upgrade"
    ),
    "sqlite-newer-optuna-schema": _storage(
        _sqlite_file(_schema_of("99.0.0", "v99.0.0")), "optuna>=99.0.0"
    ),
    "out-study-db-garbage": lambda x, w: (
        ["--budget-table", str(x.devices), "--study", str(STUDY)]
        if x.write("out/study.db", b"\x00garbage" * 1000)
        else [],
        "not a readable SQLite",
    ),
    # hostile or damaged files
    "yaml-alias-bomb": lambda x, w: (_yaml_file(_BOMB)(x, w)[0], "expand to more than"),
    "yaml-python-tag": lambda x, w: (
        _yaml_file(f"name: !!python/object/apply:os.system ['touch {x.marker}']\n")(x, w)[0],
        "remove the tag",
    ),
    "yaml-custom-tag": lambda x, w: (
        _yaml_file("name: t\nanchors: !include other.yaml\n")(x, w)[0],
        "'!include'",
    ),
    "csv-100-mb": _big_csv,
    "export-json-garbage": _export(
        lambda p: p.write_bytes(b"\xff\xfe" + os.urandom(4096)), "is not UTF-8 text"
    ),
    "export-json-truncated": _export(
        lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "not valid JSON"
    ),
    "export-weights-truncated": _export(
        lambda p: _weights_file(p).write_bytes(_weights_file(p).read_bytes()[:100]), "sha256"
    ),
    "export-weights-swapped": _export(_swap_weights, "sha256"),
    "export-checkpoint-garbage": _export(
        _point_checkpoint(lambda c, x: c.write_bytes(os.urandom(2048))), "sha256", key="vit_cnn"
    ),
    "export-checkpoint-pickled-code": _export(
        _point_checkpoint(
            lambda c, x: torch.save({"state_dict": {}, "payload": _Evil(x)}, c),
        ),
        "sha256",
        key="vit_cnn",
    ),
}


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(
    name, tmp_path, tmp_path_factory, weights, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a default --out would land here
    inputs = Inputs(tmp_path, tmp_path / "devices.csv", tmp_path / "pwned", tmp_path_factory)
    inputs.devices.write_text("device,max_macs\nsmall,10M\n")
    argv, needle = CASES[name](inputs, weights)
    out = tmp_path / "out"
    entry = main
    if argv[:1] == ["search.export"]:
        entry, argv = export_main, argv[1:]
    elif "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    existed = out.exists()
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in _files(tmp_path)}
    try:
        rc = entry(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err
    assert SECRET not in err + captured.out, "a password was printed"
    assert existed or not out.exists(), f"{argv} created {out}"
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in _files(tmp_path)}
    assert after == before, "something was written or changed"
    assert not inputs.marker.exists(), "pickled or tagged code was executed"


def _old_table(doc: dict) -> None:
    doc["format"] = "stitchsearch-latency-table/2"  # parts timed one after another


def _no_noise(doc: dict) -> None:
    del doc["runtimes"]["torch"]["1"]["noise"]


def _bad_noise(doc: dict) -> None:
    doc["runtimes"]["torch"]["1"]["noise"]["floor_pct"] = "quiet"


# Each case: a change to a valid latency table -> text the error line must hold.
TABLE_CASES = {
    "old-format": (_old_table, "'stitchsearch-latency-table/2' (an older table format"),
    "noise-missing": (_no_noise, "field 'runtimes.torch.1.noise': missing: the noise floor"),
    "noise-malformed": (_bad_noise, "'runtimes.torch.1.noise.floor_pct': must be a number"),
}


@pytest.mark.parametrize("name", list(TABLE_CASES))
def test_a_bad_latency_table_exits_2_with_one_line(name, tiny_table, tmp_path, capsys) -> None:
    change, needle = TABLE_CASES[name]
    doc = json.loads(tiny_table.read_text())
    doc["device"] = "dev"
    change(doc)
    (tmp_path / "dev.json").write_text(json.dumps(doc))
    devices = tmp_path / "devices.csv"
    devices.write_text("device,max_latency_ms,latency_table\ndev,5,dev.json\n")
    before = {p: p.stat().st_mtime_ns for p in _files(tmp_path)}
    out = tmp_path / "out"
    rc = main(["--budget-table", str(devices), "--study", str(STUDY), "--out", str(out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert needle in lines[0] and "re-profile the device: python -m search.profile" in lines[0]
    assert "Traceback" not in err and not out.exists()
    assert {p: p.stat().st_mtime_ns for p in _files(tmp_path)} == before


def test_help_and_subprocess_error_have_no_traceback(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "search.run", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0
    assert "--budget-table" in res.stdout and "--ray-address" in res.stdout
    bad = tmp_path / "b.csv"
    bad.write_text("device,max_params\n,1M\n")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "search.run",
            "--budget-table",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "b.csv:2" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
