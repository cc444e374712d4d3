"""The one definition of the segmentation settings (UniversalSegLib.request): CLI flags derived from the fields and
back, the older flag names, the fast preset, the checks and their messages, the summary JSON, the JSON schema, and
the Slicer parameter node's fields against the request's."""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import fields
from types import SimpleNamespace

import pytest

from conftest import REPO, shared_path
from UniversalSegLib.cli import build_parser, main
from UniversalSegLib.errors import ClassNameError, InputError
from UniversalSegLib.pipeline import SegmentationOptions
from UniversalSegLib.postprocess import PostprocessOptions
from UniversalSegLib.request import PRESETS, SegmentationRequest, check_setting

sys.path.insert(0, str(REPO / "UniversalSeg"))
from UniversalSegSlicerLib.parameters import NODE_DEVICES, NOT_IN_GUI, PARAMETER_NODE_FIELDS, SegmentationParameters  # noqa: E402

REQUEST_FIELDS = [f.name for f in fields(SegmentationRequest)]


def parse(*flags: str) -> SegmentationRequest:
    """The request the real ``universalseg segment`` parser makes of ``flags``."""
    return SegmentationRequest.from_args(
        build_parser().parse_args(["segment", "in.nii.gz", "-o", "out.nii.gz", *flags])
    )


# ------------------------------------------------------------------------------------------------ flags <-> fields
ROUND_TRIP = [
    SegmentationRequest(),
    SegmentationRequest(fast=True),
    SegmentationRequest(
        classes=["liver", "right kidney"],
        prompt=["IVC and both kidneys", "aorta"],
        model="x.pt",
        device="cuda:1",
        backend="openvino",
        precision="float32",
        overlap=0.25,
        threshold=0.3,
        class_thresholds={"liver tumor": 0.2, "spleen": 0.7},
        window_batch=4,
    ),
    SegmentationRequest(
        classes="all",
        overlap=0.0,
        precision="auto",
        postprocess=False,
        keep_largest_component=False,
        split_lungs=False,
        clear_portal_vein_below_pancreas=False,
        keep_tumors_inside_organs=False,
    ),
    SegmentationRequest(
        classes=("spleen",), filter_small_tumors=True, separate_lungs=True, fill_holes=True, precision="bfloat16"
    ),  # bfloat16 (at overlap 0.5): the preset's value, written as --fast
    SegmentationRequest(overlap=0.0, precision="bfloat16", device="cpu"),  # the preset plus another overlap
]


@pytest.mark.parametrize("request_", ROUND_TRIP)
def test_cli_flags_round_trip(request_):
    args = request_.to_cli_args()
    assert parse(*args) == request_, args
    assert SegmentationRequest.from_json(json.loads(json.dumps(request_.to_json()))) == request_


def test_every_field_has_a_flag_and_defaults_write_none():
    parser = build_parser()
    segment = parser._subparsers._group_actions[0].choices["segment"]
    dests = {a.dest for a in segment._actions}
    assert set(REQUEST_FIELDS) <= dests
    assert SegmentationRequest().to_cli_args() == []
    # one non-default value per field shows up in the flags, under the field's flag
    for f in fields(SegmentationRequest):
        if f.name == "class_thresholds":
            continue
        changed = {"bool": not f.default, "float": 0.25, "int": 3}.get(str(f.type), None)
        if changed is None:
            continue
        args = SegmentationRequest(**{f.name: changed}).to_cli_args()
        assert f.metadata["flag"] in args, (f.name, args)


OLD_FLAGS = [  # flag -> what it did before the request existed (PostprocessOptions / SegmentationOptions)
    (["--no-tumor-filter"], lambda o: o.postprocess == PostprocessOptions(tumors_in_parents=False)),
    (["--no-lung-split"], lambda o: o.postprocess == PostprocessOptions(lungs=False)),
    (["--no-portal-vein-filter"], lambda o: o.postprocess == PostprocessOptions(portal_vein=False)),
    (["--no-largest-component"], lambda o: o.postprocess == PostprocessOptions(largest_component=False)),
    (["--no-postprocess"], lambda o: o.postprocess == PostprocessOptions.none()),
    (["--fast"], lambda o: o.fast and o.effective_overlap == 0.5 and o.effective_precision == "bfloat16"),
    (["--overlap", "0.25"], lambda o: o.effective_overlap == 0.25 and o.effective_precision == "float32"),
    (["--threshold", "0.3"], lambda o: o.threshold == 0.3),
    (
        ["--class-threshold", "liver tumor=0.3", "--class-threshold", "spleen=0.6"],
        lambda o: o.class_thresholds == {27: 0.3, 1: 0.6},
    ),
    (["--window-batch", "2"], lambda o: o.sw_batch_size == 2),
    (["--backend", "torch"], lambda o: o.backend == "torch"),
    (["--device", "cpu"], lambda o: o.device == "cpu"),
    (
        [],
        lambda o: (
            o.postprocess == PostprocessOptions()
            and not o.fast
            and o.effective_overlap == 0.5
            and o.effective_precision == "float32"
            and o.threshold == 0.5
        ),
    ),
]


@pytest.mark.parametrize("flags, check", OLD_FLAGS, ids=[" ".join(f) or "none" for f, _ in OLD_FLAGS])
def test_old_flags_still_work(flags, check):
    request = parse(*flags)
    request.validate()
    assert check(request.to_options())


@pytest.mark.parametrize(
    "flag, step",
    [
        ("--filter-small-tumors", "tumor_filter"),
        ("--separate-lungs", "lung_separation"),
        ("--fill-holes", "fill_holes"),
    ],
)
def test_steps_beyond_the_published_ones_are_reachable(flag, step):
    assert not getattr(parse().to_options().postprocess, step)
    post = parse(flag).to_options().postprocess
    assert post == PostprocessOptions(**{step: True})


def test_new_step_names_match_the_old_flags():
    for new, old in (
        ("--no-keep-tumors-inside-organs", "--no-tumor-filter"),
        ("--no-split-lungs", "--no-lung-split"),
        ("--no-clear-portal-vein-below-pancreas", "--no-portal-vein-filter"),
        ("--no-keep-largest-component", "--no-largest-component"),
    ):
        assert parse(new) == parse(old) != parse()


# ---------------------------------------------------------------------------------------------------- the preset
def test_fast_preset_and_explicit_overlap_or_precision():
    # The preset keeps the overlap: below 0.5 the trained bundled model's answer moves (benchmarks/bench_presets.py).
    assert (parse("--fast").overlap, parse("--fast").precision) == (0.5, "bfloat16")
    both = parse("--fast", "--overlap", "0.25")  # an explicit overlap goes with the preset
    assert (both.overlap, both.precision) == (0.25, "bfloat16")
    assert both.to_options().effective_overlap == 0.25 and both.to_options().effective_precision == "bfloat16"
    full = parse("--fast", "--precision", "float32")  # an explicit precision wins over the preset's
    assert (full.overlap, full.precision) == (0.5, "float32") and full.to_options().effective_precision == "float32"
    alone = parse("--precision", "bfloat16")
    assert alone == parse("--fast") and alone.uses_fast_preset
    assert SegmentationRequest(fast=True) == SegmentationRequest(**PRESETS["fast"])
    assert SegmentationRequest(fast=True, overlap=0.25).overlap == 0.25


# ------------------------------------------------------------------------------------------------- validation
BAD = [
    (dict(overlap=1.0), InputError, r"^overlap must be at least 0 and below 1, got 1.0$"),
    (dict(overlap=-0.1), InputError, "overlap must be at least 0"),
    (dict(threshold=0.0), InputError, r"^threshold must be between 0 and 1 \(exclusive\), got 0.0$"),
    (dict(threshold=1.0), InputError, "threshold must be between 0 and 1"),
    (dict(class_thresholds={"liver tumor": 1.5}), InputError, "got 1.5 for class liver tumor$"),
    (dict(class_thresholds={"livr tumour x": 0.5}), ClassNameError, "unknown class"),
    (dict(window_batch=0), InputError, r"^window batch size must be at least 1, got 0$"),
    (dict(backend="tensorrt"), InputError, r"^unknown backend 'tensorrt'; choose one of auto, torch, openvino$"),
    (dict(precision="float16"), InputError, r"^unknown precision 'float16'; choose one of auto, float32, bfloat16$"),
    (dict(device="tpu"), InputError, "^unknown device 'tpu'; use auto, cpu or cuda"),
    (dict(classes=""), InputError, "--classes names no class"),
    (dict(classes=",,,"), InputError, "--classes names no class"),
    (dict(classes="livr"), ClassNameError, "unknown class 'livr'"),
]


@pytest.mark.parametrize("values, error, message", BAD, ids=[str(v) for v, _, _ in BAD])
def test_validation_messages(values, error, message):
    with pytest.raises(error, match=message):
        SegmentationRequest(**values).validate()


def test_valid_requests_pass_and_the_engine_options_use_the_same_checks():
    for request in ROUND_TRIP:
        request.validate()
    SegmentationRequest(classes=",,,", prompt="IVC").validate()  # a prompt alone says what to segment
    with pytest.raises(InputError) as from_request:
        SegmentationRequest(overlap=1.0).validate()
    with pytest.raises(InputError) as from_options:
        SegmentationOptions(overlap=1.0).validate()
    assert str(from_options.value) == str(from_request.value)
    with pytest.raises(InputError, match="unknown precision"):
        SegmentationOptions(precision="float16").validate()
    with pytest.raises(InputError, match="for class 27$"):
        check_setting("threshold", 2.0, " for class 27")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--class-threshold", "liver"], "--class-threshold needs CLASS=T"),
        (["--class-threshold", "liver=high"], "is not a number"),
    ],
)
def test_malformed_flags(flags, message):
    with pytest.raises(InputError, match=message):
        parse(*flags)


def test_cli_refuses_a_bad_window_batch_in_one_line(tmp_path, capsys):
    ct = shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")
    code = main(["segment", str(ct), "-o", str(tmp_path / "o.nii.gz"), "--window-batch", "0", "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["universalseg: error: window batch size must be at least 1, got 0"]


# ------------------------------------------------------------------------------------------- summary, schema
def test_summary_records_the_request(tiny_model_path, tmp_path, capsys):
    ct = shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")
    summary = tmp_path / "summary.json"
    flags = [
        "--classes",
        "liver,liver tumor",
        "--fast",
        "--overlap",
        "0.25",
        "--fill-holes",
        "--no-tumor-filter",
        "--device",
        "cpu",
        "--model",
        str(tiny_model_path),
    ]
    code = main(
        [
            "segment",
            str(ct),
            "-o",
            str(tmp_path / "seg.nii.gz"),
            "--summary",
            str(summary),
            "--progress",
            "none",
            *flags,
        ]
    )
    assert code == 0, capsys.readouterr().err
    settings = json.loads(summary.read_text())["settings"]
    assert settings["request"] == parse(*flags).to_json()
    assert settings["request"]["overlap"] == 0.25 and settings["request"]["precision"] == "bfloat16"
    assert settings["overlap"] == 0.25 and settings["postprocess"]["fill_holes"] is True
    assert settings["postprocess"]["tumors_in_parents"] is False


def test_json_schema_is_derived_from_the_fields():
    schema = SegmentationRequest.json_schema()
    props = schema["properties"]
    assert set(props) == set(REQUEST_FIELDS) | {"fast"} and schema["additionalProperties"] is False
    assert props["backend"]["enum"] == ["auto", "torch", "openvino"]
    assert props["precision"]["enum"] == ["auto", "float32", "bfloat16"]
    assert props["overlap"] == {
        **props["overlap"],
        "type": "number",
        "minimum": 0.0,
        "exclusiveMaximum": 1.0,
        "default": 0.5,
    }
    assert props["threshold"]["exclusiveMinimum"] == 0.0 and props["window_batch"]["minimum"] == 1
    assert props["class_thresholds"]["additionalProperties"]["exclusiveMaximum"] == 1.0
    assert props["fill_holes"] == {**props["fill_holes"], "type": "boolean", "default": False}
    json.dumps(schema)  # plain JSON
    for request in ROUND_TRIP:  # every request's JSON fits the schema's types and enums
        for name, value in request.to_json().items():
            kinds = props[name]["type"] if isinstance(props[name]["type"], list) else [props[name]["type"]]
            python = {
                "array": list,
                "null": type(None),
                "string": str,
                "number": (int, float),
                "integer": int,
                "boolean": bool,
                "object": dict,
            }
            assert any(isinstance(value, python[k]) for k in kinds), (name, value)
            assert value in props[name].get("enum", [value])
    with pytest.raises(InputError, match="unknown request field"):
        SegmentationRequest.from_json({"overlapp": 0.5})


# ---------------------------------------------------------------------------------------------- Slicer parameters
def parameter_node_defaults() -> dict[str, object]:
    """Fields of UniversalSegParameterNode (UniversalSeg.py) -> their default (None without one), from the source."""
    tree = ast.parse((REPO / "UniversalSeg" / "UniversalSeg.py").read_text(encoding="utf-8"))
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "UniversalSegParameterNode")
    out: dict[str, object] = {}
    for statement in cls.body:
        if isinstance(statement, ast.AnnAssign):
            value = statement.value
            out[statement.target.id] = (
                None if value is None else "DEFAULT_MODEL" if isinstance(value, ast.Name) else ast.literal_eval(value)
            )
    return out


def parameter_node_bounds() -> dict[str, tuple]:
    tree = ast.parse((REPO / "UniversalSeg" / "UniversalSeg.py").read_text(encoding="utf-8"))
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "UniversalSegParameterNode")
    out = {}
    for statement in cls.body:
        if isinstance(statement, ast.AnnAssign):
            for call in ast.walk(statement.annotation):
                if isinstance(call, ast.Call) and call.func.id == "WithinRange":
                    out[statement.target.id] = tuple(ast.literal_eval(a) for a in call.args)
                elif isinstance(call, ast.Call) and call.func.id == "Choice":
                    out[statement.target.id] = tuple(ast.literal_eval(call.args[0]))
    return out


NOT_SETTINGS = {"inputVolume", "outputSegmentation", "quality", "overwrite", "exportDatasetName", "exportSplit"}


def test_parameter_node_settings_match_the_request_one_to_one():
    node = parameter_node_defaults()
    settings = set(node) - NOT_SETTINGS
    assert settings == set(PARAMETER_NODE_FIELDS), "a parameter node setting without a request field, or the reverse"
    mapped = list(PARAMETER_NODE_FIELDS.values())
    assert len(set(mapped)) == len(mapped) and set(mapped) <= set(REQUEST_FIELDS)
    assert set(mapped) | NOT_IN_GUI == set(REQUEST_FIELDS) and not set(mapped) & NOT_IN_GUI, (
        "every request field is either a parameter node field or listed in NOT_IN_GUI"
    )
    # the node's defaults are the request's defaults
    from UniversalSegLib.registry import DEFAULT_MODEL

    defaults = {k: (DEFAULT_MODEL if v == "DEFAULT_MODEL" else v) for k, v in node.items()}
    assert SegmentationParameters.fromParameterNode(SimpleNamespace(**defaults)) == SegmentationParameters(classes=None)
    # ranges and choices the GUI offers are valid requests
    bounds = parameter_node_bounds()
    for name in ("overlap", "threshold"):
        for value in bounds[name]:
            check_setting(PARAMETER_NODE_FIELDS[name], float(value))
    assert set(bounds["device"]) == set(NODE_DEVICES)
    for device in NODE_DEVICES.values():
        check_setting("device", device)
    assert set(bounds["quality"]) == {"normal", "fast"}


def test_parameter_node_quality_is_the_fast_preset_and_steps_map_by_name():
    from UniversalSegLib.registry import DEFAULT_MODEL

    node = SimpleNamespace(
        **{
            **parameter_node_defaults(),
            "model": DEFAULT_MODEL,
            "classes": "spleen,liver",
            "quality": "fast",
            "overlap": 0.3,
            "tumorFilter": False,
            "lungSplit": False,
            "device": "gpu",
            "overwrite": True,
        }
    )
    params = SegmentationParameters.fromParameterNode(node)
    assert (params.overlap, params.precision, params.device, params.overwrite) == (0.5, "bfloat16", "cuda", True)
    assert not params.keep_tumors_inside_organs and not params.split_lungs and params.keep_largest_component
    args = params.to_cli_args()
    assert "--fast" in args and "--overlap" not in args and "--no-tumor-filter" not in args
    assert parse(*args) == SegmentationRequest(**params.to_json())
    normal = SegmentationParameters.fromParameterNode(SimpleNamespace(**{**vars(node), "quality": "normal"}))
    assert (normal.overlap, normal.precision) == (0.3, "auto")
