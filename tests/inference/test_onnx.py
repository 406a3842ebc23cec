"""`seg export` and `seg predict --backend onnxruntime`; prediction sharded with --num-parts / --devices."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from seg.cli import main
from seg.data.synthetic import write_dataset
from seg.errors import CheckpointError, SegError
from seg.inference.checkpoint import TrainedModel, build_network, load_trained_model
from seg.inference.onnx_model import OnnxNetwork, export_onnx, load_onnx_model, onnx_device
from seg.inference.folder import predict_folder
from seg.inference.outputs import merge_summaries, part_summary, shard
from seg.inference.predictor import Predictor


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Five synthetic scans larger than the window (32 x 32 x 16 at 1.5 x 1.5 x 2 mm): several windows each."""
    data = write_dataset(tmp_path_factory.mktemp("onnx") / "data", cases=5, size=(40, 36, 28), seed=3)
    return data / "imagesTr"


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    assert main(["export", "-c", str(trained_checkpoint), "-o", str(path), "--gates"]) == 0
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz")) if "_gate_" not in p.name}


# ---- export --------------------------------------------------------------------------------------------------------
def test_export_has_dynamic_axes_seg_metadata_and_gate_outputs(exported, trained_checkpoint, capsys):
    model = onnx.load(str(exported))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    trained = load_trained_model(trained_checkpoint)
    assert meta["seg.preprocessing"] == json.loads(json.dumps(trained.preprocessing))
    assert meta["seg.class_names"] == trained.class_names == ["liver", "lesion"]
    assert meta["seg.roi_size"] == [32, 32, 16] and meta["seg.spatial_dims"] == 3
    assert meta["seg.version"] == __import__("seg").__version__
    image = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in image] == ["batch", "", "spatial_0", "spatial_1", "spatial_2"]
    assert [o.name for o in model.graph.output] == ["logits", "gate_0", "gate_1", "cbam_0", "cbam_1", "cbam_2"]
    logits, gate = (model.graph.output[i].type.tensor_type.shape.dim for i in (0, 1))
    assert [d.dim_param for d in logits] == ["batch", "", "spatial_0", "spatial_1", "spatial_2"]
    assert [d.dim_param or d.dim_value for d in gate] == ["batch", 1, "gate_0_spatial_0", "gate_0_spatial_1",
                                                          "gate_0_spatial_2"]
    assert not list(exported.parent.glob(".tmp-*"))  # written under a temporary name, then renamed


def test_export_above_the_tolerance_is_one_line_and_writes_nothing(trained_checkpoint, tmp_path, capsys):
    code = main(["export", "-c", str(trained_checkpoint), "-o", str(tmp_path / "m.onnx"), "--tolerance", "1e-30"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "ONNX Runtime and PyTorch differ by" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "x"])
def test_a_tolerance_that_is_no_distance_is_refused_by_argparse(trained_checkpoint, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "-c", str(trained_checkpoint), "-o", str(tmp_path / "m.onnx"), "--tolerance", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--tolerance: must be a number >= 0" in err and "differ by" not in err
    assert list(tmp_path.iterdir()) == []


def test_exporting_an_onnx_model_says_so(exported, tmp_path, capsys):
    code = main(["export", "-c", str(exported), "-o", str(tmp_path / "again.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"{exported}: is an ONNX model, not a checkpoint" in err and "weights_only" not in err


# ---- the ONNX Runtime backend --------------------------------------------------------------------------------------
def test_onnxruntime_labels_equal_pytorchs(exported, trained_checkpoint, scans, tmp_path):
    torch_out, onnx_out, fly_out = tmp_path / "torch", tmp_path / "onnx", tmp_path / "fly"
    # float32 on both sides: the exported graph is float32 (PyTorch's "auto" may be bf16 on a CPU with AMX)
    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(torch_out), "--save-gates",
                 "--device", "cpu", "--precision", "fp32"]) == 0
    assert main(["predict", "-c", str(exported), "-i", str(scans), "-o", str(onnx_out), "--save-gates",
                 "--backend", "onnxruntime", "--device", "cpu"]) == 0
    # a .ckpt with --backend onnxruntime: exported in memory
    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(fly_out),
                 "--backend", "onnxruntime", "--device", "cpu"]) == 0
    expected, got, fly = labels(torch_out), labels(onnx_out), labels(fly_out)
    assert len(expected) == 5 and expected.keys() == got.keys() == fly.keys()
    voxels = sum(a.size for a in expected.values())
    assert sum(int((expected[k] == got[k]).sum()) for k in expected) / voxels >= 0.9999
    assert sum(int((expected[k] == fly[k]).sum()) for k in expected) / voxels >= 0.9999
    gate = "synth_000_gate_0.nii.gz"
    assert np.allclose(nib.load(torch_out / gate).get_fdata(), nib.load(onnx_out / gate).get_fdata(), atol=1e-4)
    assert [r["case"] for r in read_rows(onnx_out / "summary.csv")] == sorted(k[:-7] for k in expected)


def test_missing_onnxruntime_is_one_line_naming_the_extra(trained_checkpoint, scans, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    for argv in (["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "out"),
                  "--backend", "onnxruntime"],
                 ["export", "-c", str(trained_checkpoint), "-o", str(tmp_path / "m.onnx")]):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and "pip install seg[onnx]" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


def test_unusable_onnx_files_are_checkpoint_errors(trained_checkpoint, exported, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(CheckpointError, match="cannot read the ONNX model"):
        load_onnx_model(garbage)
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(exported))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    with pytest.raises(CheckpointError, match="not a seg ONNX model"):
        load_onnx_model(foreign)
    with pytest.raises(CheckpointError, match="runs with --backend onnxruntime"):
        Predictor.from_checkpoint(exported, device="cpu")


# ---- hostile ONNX models: refused once, before any scan -------------------------------------------------------
def _foreign_network(exported: Path, trained_checkpoint: Path, keep_shapes: bool = True, **network) -> onnx.ModelProto:
    """An untrained network with `network`'s settings, exported, under `exported`'s seg metadata."""
    trained = load_trained_model(trained_checkpoint)
    hparams = {**trained.hparams, **network}
    if hparams["spatial_dims"] == 2:
        hparams["roi_size"] = list(trained.roi_size)[:2]
    model = TrainedModel(build_network(hparams).eval(), {"patch_size": hparams["roi_size"]}, hparams)
    proto = onnx.load_from_string(export_onnx(model, None)[0])
    del proto.metadata_props[:]
    proto.metadata_props.extend(onnx.load(str(exported)).metadata_props)
    if not keep_shapes:  # only the probe run can tell then
        for value in (*proto.graph.input, *proto.graph.output):
            value.type.tensor_type.ClearField("shape")
    return proto


def _with_metadata(exported: Path, key: str, edit) -> onnx.ModelProto:
    proto = onnx.load(str(exported))
    entry = next(p for p in proto.metadata_props if p.key == key)
    entry.value = json.dumps(edit(json.loads(entry.value))) if callable(edit) else edit
    return proto


def _first_weight(proto: onnx.ModelProto) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if len(t.dims) == 5)


def _external(proto: onnx.ModelProto, location: str, dims=None) -> onnx.ModelProto:
    weight = _first_weight(proto)
    if dims is not None:
        weight.ClearField("dims")
        weight.dims.extend(dims)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    return proto


def _claiming(proto: onnx.ModelProto, dims) -> onnx.ModelProto:
    weight = _first_weight(proto)
    weight.ClearField("dims")
    weight.dims.extend(dims)
    return proto


HOSTILE = {
    "7 output channels": (lambda e, c, d: _foreign_network(e, c, out_channels=7),
                          "'logits' has 7 channels, but the metadata says 3 classes"),
    "7 output channels, shapes undeclared": (lambda e, c, d: _foreign_network(e, c, keep_shapes=False, out_channels=7),
                                             "have shape (1, 7, 4, 4, 4), not (1, 3, 4, 4, 4)"),
    "one output channel": (lambda e, c, d: _foreign_network(e, c, out_channels=1),
                           "'logits' has 1 channels, but the metadata says 3 classes"),
    "a 2D network": (lambda e, c, d: _foreign_network(e, c, spatial_dims=2),
                     "'image' has 4 axes, but the metadata says a 3D network"),
    "a 2D network, shapes undeclared": (lambda e, c, d: _foreign_network(e, c, keep_shapes=False, spatial_dims=2),
                                        "ONNX Runtime cannot run it on a 4 x 4 x 4 window of 1 channel(s)"),
    "two input channels": (lambda e, c, d: _foreign_network(e, c, in_channels=2),
                           "'image' has 2 channels, but the metadata says 1 input channels"),
    "overlap 0.999": (lambda e, c, d: _with_metadata(e, "seg.hparams", lambda h: {**h, "sw_overlap": 0.999}),
                      "hyper-parameter 'sw_overlap' is 0.999; expected a number in [0, 0.95]"),
    "a 1024^3 window": (lambda e, c, d: _with_metadata(e, "seg.hparams", lambda h: {**h, "roi_size": [1024] * 3}),
                        "window 1024 x 1024 x 1024 takes about"),
    "a NaN overlap": (lambda e, c, d: _with_metadata(e, "seg.hparams", '{"sw_overlap": NaN}'),
                      "seg.hparams metadata (export it again): not valid JSON (NaN is not a JSON number)"),
    "deep metadata": (lambda e, c, d: _with_metadata(e, "seg.class_names", "[" * 5000 + "]" * 5000),
                      "seg.class_names metadata (export it again): nested deeper than 32 levels"),
    "16 M filters": (lambda e, c, d: _claiming(onnx.load(str(e)), [16_000_000, 1, 3, 3, 3]),
                     "claims 1.6 GiB (dims [16000000, 1, 3, 3, 3]) but holds 864 B: truncated or forged"),
    "external /dev/zero": (lambda e, c, d: _external(onnx.load(str(e)), "/dev/zero"),
                           "from external data '/dev/zero', outside the model's folder"),
    "external outside the folder": (lambda e, c, d: _external(onnx.load(str(e)), "../outside.bin"),
                                    "from external data '../outside.bin', outside the model's folder"),
    "external FIFO": (lambda e, c, d: _external(onnx.load(str(e)), "weights.fifo"), "not a regular file"),
    "external sparse 64 GiB": (lambda e, c, d: _external(onnx.load(str(e)), "sparse.bin", [2**34]),
                               "takes the weights to 64.0 GiB, more than the 8.0 GiB of memory available"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_onnx_model_is_refused_once_before_any_scan(kind, exported, trained_checkpoint, scans, tmp_path,
                                                              monkeypatch, capsys):
    import os

    monkeypatch.setenv("SEG_MEMORY_LIMIT", "8G")
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(bytes(4 * 8 * 27))  # the right size for the first weight, outside
    os.mkfifo(folder / "weights.fifo")
    with open(folder / "sparse.bin", "wb") as f:
        f.truncate(2**36)  # 64 GiB of holes
    make, expected = HOSTILE[kind]
    path = folder / "hostile.onnx"
    onnx.save(make(exported, trained_checkpoint, folder), str(path))
    capsys.readouterr()
    code = main(["predict", "-c", str(path), "-i", str(scans), "-o", str(tmp_path / "out"), "--backend",
                 "onnxruntime", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"{path}: " in err and expected in err, err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_nan_logits_fail_the_case_in_one_line_on_both_backends(exported, trained_checkpoint, scans, tmp_path,
                                                                capsys):
    proto = onnx.load(str(exported))
    weight = _first_weight(proto)
    weight.raw_data = np.full(len(weight.raw_data) // 4, np.nan, np.float32).tobytes()
    path = tmp_path / "nan.onnx"
    onnx.save(proto, str(path))
    code = main(["predict", "-c", str(path), "-i", str(scans), "-o", str(tmp_path / "out"), "--backend",
                 "onnxruntime", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    failures = [line for line in err if ".nii.gz: the network produced non-finite outputs" in line]
    assert code == 1 and len(failures) == 5 and "5 failed" in err[-1], err  # one line a case, and the count
    assert [r["status"] for r in read_rows(tmp_path / "out" / "summary.csv")] == ["failed"] * 5
    assert not list((tmp_path / "out").glob("*.nii.gz"))  # not five all-background label maps

    model = load_trained_model(trained_checkpoint)
    with torch.no_grad():
        next(model.network.parameters()).fill_(float("nan"))
    predictor = Predictor(model, device="cpu", precision="fp32")
    scan = predictor.load([next(scans.iterdir())])
    with pytest.raises(SegError, match="the network produced non-finite outputs"):
        predictor.infer(scan)


# ---- sharding ------------------------------------------------------------------------------------------------------
def test_shard_is_nnunets_split():
    ids = [f"c{i}" for i in (5, 1, 3, 0, 2, 4, 6)]
    parts = [shard(ids, 3, i) for i in range(3)]
    assert parts == [{"c0", "c3", "c6"}, {"c1", "c4"}, {"c2", "c5"}]


def test_three_parts_cover_every_case_once_and_merge(trained_checkpoint, scans, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in scans.iterdir():
        (inputs / path.name).symlink_to(path)
    (inputs / "notes.txt").write_text("not a scan")  # an ignored row, in one part only
    (inputs / "broken.nii.gz").write_bytes(b"not gzip")  # a failed case, in its own part
    output = tmp_path / "out"
    predictor = Predictor.from_checkpoint(trained_checkpoint, device="cpu")
    predicted = []
    for part in range(3):
        assert not (output / "summary.csv").exists()  # merged only once every part is done
        results = predict_folder(predictor, inputs, output, num_parts=3, part_id=part, progress=False)
        predicted.append({r.case_id for r in results if r.status != "ignored"})
        assert [r["case"] for r in read_rows(part_summary(output, part, 3)) if r["status"] != "ignored"] == \
            sorted(predicted[-1])
    every = {p.name[:-7] for p in scans.iterdir()} | {"broken"}
    assert sum(len(p) for p in predicted) == len(every) and set().union(*predicted) == every
    merged = read_rows(output / "summary.csv")
    assert [r["case"] for r in merged] == [*sorted(every), "notes.txt"]
    assert {r["case"]: r["status"] for r in merged} == {**{c: "ok" for c in every}, "broken": "failed",
                                                       "notes.txt": "ignored"}
    (output / "summary.csv").unlink()
    assert merge_summaries(output, 3) == output / "summary.csv"
    assert read_rows(output / "summary.csv") == merged


def test_merge_names_a_missing_part(tmp_path, capsys):
    (tmp_path / "summary.part-0-of-2.csv").write_text("case,status\n")
    assert main(["predict", "-o", str(tmp_path), "--num-parts", "2", "--merge-summaries"]) == 1
    err = capsys.readouterr().err.strip()
    assert "summary.part-1-of-2.csv" in err and len(err.splitlines()) == 1


def test_two_cpu_workers_share_a_folder_and_merge(trained_checkpoint, scans, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = tmp_path / "out"
    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(output),
                 "--devices", "cpu,cpu"]) == 0
    parts = [{r["case"] for r in read_rows(part_summary(output, i, 2))} for i in range(2)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == {p.name[:-7] for p in scans.iterdir()}
    assert [r["status"] for r in read_rows(output / "summary.csv")] == ["ok"] * 5


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_untrained_networks_export_with_gates_within_the_tolerance(spatial_dims):
    roi = [16, 16, 8][:spatial_dims]
    hparams = {"spatial_dims": spatial_dims, "in_channels": 2, "out_channels": 3, "channels": [4, 8, 16],
               "strides": [2, 2], "roi_size": roi}
    model = TrainedModel(build_network(hparams).eval(), {"patch_size": roi, "class_names": ["a", "b"]}, hparams)
    data, difference = export_onnx(model, None, gates=True)
    assert difference < 1e-4  # batch 3 at the roi and batch 1 at twice its first axis: the axes are dynamic
    network = OnnxNetwork(data, [o.name for o in onnx.load_from_string(data).graph.output])
    x = torch.randn(2, 2, *[2 * r for r in roi])
    logits, gates = network.forward_with_gates(x)
    assert logits.shape == (2, 3, *x.shape[2:]) and len(gates) == 2
    assert torch.allclose(logits, model.network(x), atol=1e-4)


def test_cuda_without_the_cuda_provider_is_one_line(exported):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(SegError, match="needs onnxruntime-gpu"):
        load_onnx_model(exported).network.to("cuda")
    assert onnx_device("auto") == "cpu" and onnx_device("cpu") == "cpu"


def test_save_gates_needs_a_model_exported_with_gates(trained_checkpoint, scans, tmp_path, capsys):
    plain = tmp_path / "plain.onnx"
    assert main(["export", "-c", str(trained_checkpoint), "-o", str(plain)]) == 0
    assert [o.name for o in onnx.load(str(plain)).graph.output] == ["logits"]
    capsys.readouterr()
    code = main(["predict", "-c", str(plain), "-i", str(scans), "-o", str(tmp_path / "out"), "--backend",
                 "onnxruntime", "--save-gates"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "seg export --gates" in err
    assert not (tmp_path / "out").exists()
