"""Checkpoint loading, architecture inference, validation and torchvision weight names.

No test touches the network: torch.hub's downloader is replaced for the whole module, and the
weight-name tests run against a private TORCH_HOME under tmp_path.
"""

import collections
import functools
import os
import sys
import urllib.error

import pytest
import torch
from torch import nn

import fastres
from fastres.checkpoints import (
    Architecture,
    download_weights,
    infer_architecture,
    load_checkpoint,
    resolve_model,
    validate_state_dict,
    weight_names,
    weights_cache_path,
    weights_url,
)
from fastres.errors import ArchitectureMismatchError, CheckpointError, UnknownModelError
from fastres.reference import build_resnet
from fastres.specs import MODEL_SPECS, ResNetSpec
from fastres.testing import make_calibrated_model

MODELS = list(MODEL_SPECS)
NUM_CLASSES = [pytest.param(1000, id="1000cls"), pytest.param(10, id="10cls"), pytest.param(1, id="1cls")]
TINY = ResNetSpec("resnet-custom", "basic", (1, 1, 1, 1))

# torchvision's published file names (download.pytorch.org/models/<file>).
TORCHVISION_FILES = {
    ("resnet18", "IMAGENET1K_V1"): "resnet18-f37072fd.pth",
    ("resnet34", "IMAGENET1K_V1"): "resnet34-b627a593.pth",
    ("resnet50", "IMAGENET1K_V1"): "resnet50-0676ba61.pth",
    ("resnet50", "IMAGENET1K_V2"): "resnet50-11ad3fa6.pth",
    ("resnet101", "IMAGENET1K_V1"): "resnet101-63fe2227.pth",
    ("resnet101", "IMAGENET1K_V2"): "resnet101-cd907fc2.pth",
    ("resnet152", "IMAGENET1K_V1"): "resnet152-394f9c45.pth",
    ("resnet152", "IMAGENET1K_V2"): "resnet152-f82ba261.pth",
    ("resnext50_32x4d", "IMAGENET1K_V1"): "resnext50_32x4d-7cdf4587.pth",
    ("resnext50_32x4d", "IMAGENET1K_V2"): "resnext50_32x4d-1a0047aa.pth",
    ("resnext101_32x8d", "IMAGENET1K_V1"): "resnext101_32x8d-8ba56ff5.pth",
    ("resnext101_32x8d", "IMAGENET1K_V2"): "resnext101_32x8d-110c445d.pth",
    ("resnext101_64x4d", "IMAGENET1K_V1"): "resnext101_64x4d-173b62eb.pth",
    ("wide_resnet50_2", "IMAGENET1K_V1"): "wide_resnet50_2-95faca4d.pth",
    ("wide_resnet50_2", "IMAGENET1K_V2"): "wide_resnet50_2-9ba9bcbe.pth",
    ("wide_resnet101_2", "IMAGENET1K_V1"): "wide_resnet101_2-32ee1156.pth",
    ("wide_resnet101_2", "IMAGENET1K_V2"): "wide_resnet101_2-d733dc28.pth",
}


class NotATensor:
    """A custom class: pickling an instance stores a reference to code."""

    def __init__(self):
        self.value = 3


class MyOrderedDict(collections.OrderedDict):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every download attempt fails as it would offline; `attempts` records the URLs tried."""
    attempts = []

    def offline(url, dst, hash_prefix=None, progress=True):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return attempts


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A private TORCH_HOME; the hub cache is tmp_path/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # torch.hub.set_dir() would take precedence over TORCH_HOME; clear it for this test only.
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path


def meta_state(spec, num_classes=1000):
    with torch.device("meta"):  # names and shapes only
        return build_resnet(spec, num_classes).state_dict()


@functools.lru_cache(maxsize=2)
def _calibrated(spec, num_classes):
    model = make_calibrated_model(spec, num_classes, calibration_images=2, image_size=32)
    return tuple(model.state_dict().items())


def calibrated_state(spec, num_classes=1000):
    """Real weights with calibrated BN statistics (a fresh dict; the tensors must not be mutated)."""
    return dict(_calibrated(spec, num_classes))


def assert_same_tensors(got, expected):
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def save(state, path, layout="plain"):
    """Write `state` the way various training scripts do."""
    if layout == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif layout == "orig_mod":
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    elif layout == "module_orig_mod":
        state = {f"module._orig_mod.{k}": v for k, v in state.items()}
    elif layout != "plain" and layout != "legacy":
        state = {layout: state, "epoch": 7, "optimizer": {"lr": 0.1, "state": {}}, "arch": "resnet"}
    if path.suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch", reason="optional extra not installed")
        safetensors_torch.save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=layout != "legacy")
    return path


# --- round trips -------------------------------------------------------------------------------

EVERY_MODEL_ROUND_TRIP = [
    pytest.param("resnet18", 1000, ".pth", "legacy"),
    pytest.param("resnet34", 10, ".pt", "state_dict"),
    pytest.param("resnet50", 1, ".bin", "model"),
    pytest.param("resnet101", 1000, ".pth", "plain"),
    pytest.param("resnet152", 10, ".pth", "model_state_dict", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", 1, ".pt", "module"),
    pytest.param("resnext101_32x8d", 1000, ".pth", "orig_mod", marks=pytest.mark.slow),
    pytest.param("resnext101_64x4d", 10, ".safetensors", "module", marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", 1, ".bin", "module_orig_mod", marks=pytest.mark.slow),
    pytest.param("wide_resnet101_2", 1000, ".safetensors", "plain", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, num_classes, suffix, layout", EVERY_MODEL_ROUND_TRIP)
def test_every_model_round_trips_through_a_file(tmp_path, name, num_classes, suffix, layout):
    state = calibrated_state(name, num_classes)
    path = save(state, tmp_path / f"checkpoint{suffix}", layout)
    arch, loaded = resolve_model(name, path)
    assert arch == Architecture(MODEL_SPECS[name], num_classes)
    assert_same_tensors(loaded, state)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_checkpoint_path_alone_is_enough(tmp_path, name):
    path = save(calibrated_state(name, 10), tmp_path / f"{name}.pth")
    arch, _ = resolve_model(str(path))
    assert arch == Architecture(MODEL_SPECS[name], 10)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
@pytest.mark.parametrize(
    "layout",
    ["plain", "legacy", "state_dict", "model", "model_state_dict", "module", "orig_mod", "module_orig_mod"],
)
def test_file_formats_and_layouts(tmp_path, suffix, layout):
    if suffix == ".safetensors" and layout not in ("plain", "module", "orig_mod"):
        pytest.skip("safetensors files hold tensors only: no nesting, no legacy pickle format")
    state = calibrated_state(TINY, 10)
    loaded = load_checkpoint(save(state, tmp_path / f"weights{suffix}", layout))
    assert type(loaded) is dict
    assert_same_tensors(loaded, state)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
def test_every_model_resolves_from_memory(name, num_classes):
    state = meta_state(name, num_classes)
    with torch.device("meta"):
        module = build_resnet(name, num_classes)
    for weights in (state, module, nn.DataParallel(module), {"state_dict": state, "epoch": 1}):
        arch, loaded = resolve_model(name, weights, num_classes=num_classes)
        assert arch == Architecture(MODEL_SPECS[name], num_classes)
        assert set(loaded) == set(state)


# Importing torch._dynamo (on torch.compile) warns about torch.jit internals; not ours to fix.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_and_data_parallel_prefixes_are_stripped():
    model = make_calibrated_model(TINY, 3, calibration_images=2, image_size=32)
    expected = model.state_dict()
    assert_same_tensors(load_checkpoint(torch.compile(model)), expected)
    assert_same_tensors(load_checkpoint(nn.DataParallel(model)), expected)


def test_parameters_come_back_detached():
    model = build_resnet(TINY, 3)
    raw = dict(model.named_parameters())
    assert not any(t.requires_grad for t in load_checkpoint(raw).values())


def test_non_tensor_entries_are_dropped_and_num_batches_tracked_kept():
    state = meta_state("resnet18")
    loaded = load_checkpoint({**state, "epoch": 3, "note": "hello", "nested": {"a": 1}})
    assert set(loaded) == set(state)
    assert "bn1.num_batches_tracked" in loaded


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet18"])
def test_timm_style_checkpoints_load(name):
    # timm's plain ResNets share torchvision's key names but never save num_batches_tracked.
    state = {k: v for k, v in meta_state(name).items() if not k.endswith("num_batches_tracked")}
    arch, loaded = resolve_model(name, state)
    assert arch.spec is MODEL_SPECS[name]
    assert set(loaded) == set(state)


def test_timm_style_checkpoint_values_survive(tmp_path):
    state = {k: v for k, v in calibrated_state("resnet18", 1000).items() if "num_batches" not in k}
    _, loaded = resolve_model("resnet18", save(state, tmp_path / "timm_resnet18.safetensors"))
    assert_same_tensors(loaded, state)


# --- architecture inference ----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
def test_infer_architecture_names_every_model(name, num_classes):
    arch = infer_architecture(meta_state(name, num_classes))
    assert arch.spec is MODEL_SPECS[name]
    assert arch.num_classes == num_classes


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(TINY, id="basic-1111"),
        pytest.param(ResNetSpec("resnet-custom", "basic", (3, 1, 2, 5)), id="basic-3125"),
        pytest.param(ResNetSpec("resnet-custom", "bottleneck", (1, 2, 1, 1), 2, 16), id="bottleneck-g2-w16"),
        pytest.param(ResNetSpec("resnet-custom", "bottleneck", (3, 4, 6, 3), 8, 64), id="resnet50-g8-w64"),
        pytest.param(
            ResNetSpec("resnet-custom", "bottleneck", (3, 4, 6, 3), deep_stem=True), id="resnet50c-deep-stem"
        ),
        pytest.param(ResNetSpec("resnet-custom", "basic", (1, 1, 1, 1), avg_down=True), id="basic-avg-down"),
    ],
)
def test_infer_architecture_custom(spec):
    arch = infer_architecture(meta_state(spec, 5))
    assert arch == Architecture(spec, 5)
    validate_state_dict(meta_state(spec, 5), arch)


def test_custom_checkpoint_is_runnable(tmp_path):
    state = calibrated_state(TINY, 4)
    arch, loaded = resolve_model(save(state, tmp_path / "tiny.pth"))
    assert arch.spec.name == "resnet-custom"
    model = build_resnet(arch.spec, arch.num_classes).eval()
    model.load_state_dict(loaded, strict=True)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 19, 23)).shape == (2, 4)


def test_describe():
    assert (
        Architecture(MODEL_SPECS["resnet18"], 1000).describe()
        == "resnet18 (BasicBlock [2, 2, 2, 2], 1000 classes)"
    )
    assert Architecture(TINY, 1).describe() == "resnet-custom (BasicBlock [1, 1, 1, 1], 1 class)"
    assert "groups=32, width_per_group=4" in Architecture(MODEL_SPECS["resnext50_32x4d"], 10).describe()


def test_random_init_needs_no_checkpoint():
    assert resolve_model("resnet50") == (Architecture(MODEL_SPECS["resnet50"], 1000), None)
    assert resolve_model("resnet18", num_classes=7) == (Architecture(MODEL_SPECS["resnet18"], 7), None)


def test_package_exports():
    assert fastres.resolve_model is resolve_model
    assert fastres.load_checkpoint is load_checkpoint
    assert fastres.Architecture is Architecture


# --- errors -------------------------------------------------------------------------------------


def test_unknown_model():
    with pytest.raises(UnknownModelError, match="resnet19.*resnet18, resnet34"):
        resolve_model("resnet19")


def test_model_must_be_a_name_or_path():
    with pytest.raises(UnknownModelError, match="pass a module or state dict as weights="):
        resolve_model(build_resnet(TINY, 2))


@pytest.mark.parametrize("num_classes", [0, -3, 2.0, True], ids=["zero", "negative", "float", "bool"])
def test_invalid_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        resolve_model("resnet18", num_classes=num_classes)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=f"not found: {path}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model("resnet18", str(path))


def test_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a directory.*model.safetensors"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_file(tmp_path, legacy):
    path = tmp_path / "weights.pth"
    torch.save(calibrated_state(TINY, 10), path, _use_new_zipfile_serialization=not legacy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{path} is not a readable PyTorch checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content", [b"", b"hello, this is not a checkpoint\n", b"\x00" * 64], ids=["empty", "text", "zeros"]
)
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{path} is not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_corrupt_safetensors(tmp_path):
    pytest.importorskip("safetensors.torch", reason="optional extra not installed")
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda t: {"fc.weight": t, "extra": NotATensor()}, id="custom-object"),
        pytest.param(lambda t: MyOrderedDict([("fc.weight", t)]), id="ordereddict-subclass"),
        pytest.param(lambda t: {"fc.weight": t, "hook": os.getcwd}, id="function-reference"),
        pytest.param(lambda t: build_resnet(TINY, 2), id="whole-module"),
    ],
)
def test_pickled_code_is_refused(tmp_path, payload):
    path = tmp_path / "weights.pth"
    torch.save(payload(torch.ones(2, 2)), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "contains pickled code objects" in message and "only loads plain tensors" in message
    assert "state_dict()" in message
    assert info.value.__suppress_context__  # no UnpicklingError traceback chained in front


def test_no_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="contains no tensors.*epoch, optimizer"):
        load_checkpoint({"epoch": 3, "optimizer": {}})
    path = tmp_path / "list.pth"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot load a checkpoint from a int"):
        load_checkpoint(42)


def test_safetensors_missing(tmp_path, monkeypatch):
    path = save({"fc.weight": torch.ones(2, 2)}, tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"pip install fastres\[safetensors\]"):
        load_checkpoint(path)


def test_a_truncated_deep_stem_is_refused():
    state = meta_state("resnet50")
    stem = {"conv1.0.weight": torch.empty(32, 3, 3, 3), "conv1.1.weight": torch.empty(32)}
    state = stem | {k: v for k, v in state.items() if not k.startswith("conv1.")}
    arch = infer_architecture(state)  # a deep stem with torchvision's projections: timm's "C" layout
    assert arch.spec.deep_stem and not arch.spec.avg_down and arch.name == "resnet-custom"
    with pytest.raises(CheckpointError, match=r"missing \d+ keys.*conv1\.1\.bias"):
        validate_state_dict(state, arch)


def test_not_a_resnet():
    state = {"head.fc.weight": torch.empty(10, 768), "blocks.0.attn.qkv.weight": torch.empty(2304, 768)}
    with pytest.raises(
        CheckpointError, match="does not look like a torchvision ResNet.*conv1.weight, fc.weight"
    ):
        infer_architecture(state)


def test_missing_keys():
    state = meta_state("resnet18")
    for key in ("layer4.1.bn2.running_var", "layer3.0.downsample.1.weight", "bn1.bias"):
        del state[key]
    with pytest.raises(
        CheckpointError, match=r"missing 3 keys for resnet18 .*bn1.bias.*layer3.0.downsample.1.weight"
    ):
        resolve_model("resnet18", state)


def test_many_missing_keys_are_counted():
    state = {k: v for k, v in meta_state("resnet50").items() if not k.endswith("running_var")}
    with pytest.raises(CheckpointError, match=r"missing 53 keys .*: bn1.running_var, .*, \.\.\.$"):
        resolve_model("resnet50", state)


def test_missing_block():
    state = {k: v for k, v in meta_state("resnet50").items() if not k.startswith("layer2.1.")}
    with pytest.raises(CheckpointError, match=r"layer2 has blocks \[0, 2, 3\]"):
        resolve_model("resnet50", state)


def test_unexpected_keys():
    state = meta_state("resnet18") | {"aux_head.weight": torch.empty(3), "fc.scale": torch.empty(1)}
    with pytest.raises(CheckpointError, match="unexpected 2 keys for resnet18 .*: aux_head.weight, fc.scale"):
        resolve_model("resnet18", state)


def test_shape_mismatch():
    state = meta_state("resnet50")
    state["layer2.0.conv1.weight"] = torch.empty(128, 256, 3, 3, device="meta")
    with pytest.raises(
        CheckpointError, match=r"layer2.0.conv1.weight has shape \(128, 256, 3, 3\).*\(128, 256, 1, 1\)"
    ):
        resolve_model("resnet50", state)


def test_integer_weights_are_refused():
    state = meta_state("resnet18")
    state["layer1.0.conv1.weight"] = torch.empty(64, 64, 3, 3, dtype=torch.int8)
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight has dtype torch.int8"):
        resolve_model("resnet18", state)


def test_half_precision_weights_are_accepted():
    state = {k: v.half() if v.is_floating_point() else v for k, v in meta_state("resnet18").items()}
    arch, _ = resolve_model("resnet18", state)
    assert arch.spec is MODEL_SPECS["resnet18"]


@pytest.mark.parametrize(
    "checkpoint, requested, message",
    [
        (
            "resnet18",
            "resnet50",
            r"this checkpoint is a resnet18 \(BasicBlock \[2, 2, 2, 2\]\); you asked for resnet50",
        ),
        ("resnet50", "resnext50_32x4d", "this checkpoint is a resnet50 .*; you asked for resnext50_32x4d"),
        ("wide_resnet101_2", "resnet101", "this checkpoint is a wide_resnet101_2 .*width_per_group=128"),
    ],
)
def test_architecture_mismatch(checkpoint, requested, message):
    with pytest.raises(ArchitectureMismatchError, match=message):
        resolve_model(requested, meta_state(checkpoint))


def test_custom_checkpoint_for_a_named_model():
    with pytest.raises(
        ArchitectureMismatchError, match=r"resnet-custom \(BasicBlock \[1, 1, 1, 1\]\).*resnet18"
    ):
        resolve_model("resnet18", meta_state(TINY))


def test_num_classes_mismatch(tmp_path):
    with pytest.raises(ArchitectureMismatchError, match="classifier has 10 classes.*num_classes=1000"):
        resolve_model("resnet34", meta_state("resnet34", 10), num_classes=1000)
    path = save(calibrated_state(TINY, 4), tmp_path / "tiny.pth")
    with pytest.raises(ArchitectureMismatchError, match="classifier has 4 classes.*num_classes=5"):
        resolve_model(str(path), num_classes=5)


def test_checkpoint_as_model_and_weights_together(tmp_path):
    path = save(calibrated_state(TINY, 4), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="model is already a checkpoint"):
        resolve_model(path, path)


# --- torchvision weight names -------------------------------------------------------------------


@pytest.mark.parametrize("model, weights", list(TORCHVISION_FILES))
def test_weights_url(model, weights):
    assert (
        weights_url(model, weights)
        == "https://download.pytorch.org/models/" + TORCHVISION_FILES[model, weights]
    )


@pytest.mark.parametrize("model", [name for name in MODELS if not MODEL_SPECS[name].deep_stem])
def test_default_weights_are_v2_where_published(model):
    newest = "IMAGENET1K_V2" if (model, "IMAGENET1K_V2") in TORCHVISION_FILES else "IMAGENET1K_V1"
    assert weights_url(model, "DEFAULT") == weights_url(model, newest)
    assert weight_names(model) == [w for m, w in TORCHVISION_FILES if m == model] + ["DEFAULT"]


def test_weight_names_are_case_insensitive():
    assert weights_url("resnet50", "imagenet1k_v1") == weights_url("resnet50", "IMAGENET1K_V1")


def test_unknown_weight_name():
    with pytest.raises(
        CheckpointError, match="unknown weights 'IMAGENET1K_V2' for resnet18.*IMAGENET1K_V1, DEFAULT"
    ):
        resolve_model("resnet18", "IMAGENET1K_V2")
    with pytest.raises(CheckpointError, match="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        weights_url("resnet50", "IMAGENET22K")
    with pytest.raises(UnknownModelError):
        weights_url("resnet19", "DEFAULT")


def test_cache_hit(torch_home, no_network):
    state = calibrated_state("resnet18", 1000)
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert weights_cache_path("resnet18", "DEFAULT") == cached
    arch, loaded = resolve_model("resnet18", "DEFAULT")
    assert arch == Architecture(MODEL_SPECS["resnet18"], 1000)
    assert_same_tensors(loaded, state)
    assert no_network == []


def test_download_into_the_cache(torch_home, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        torch.save({"fc.weight": torch.ones(3, 4)}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    loaded = download_weights("resnet50", "IMAGENET1K_V2", progress=False)
    assert calls == [("https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "11ad3fa6")]
    assert (torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth").exists()
    assert_same_tensors(loaded, {"fc.weight": torch.ones(3, 4)})


def test_offline_download_failure(torch_home, no_network):
    cached = torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(CheckpointError) as info:
        resolve_model("resnet50", "DEFAULT")
    message = str(info.value)
    assert "could not download" in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert f"place the file at {cached}" in message
    assert "local checkpoint path" in message
    assert no_network == ["https://download.pytorch.org/models/resnet50-11ad3fa6.pth"]


def test_corrupt_cached_file(torch_home):
    cached = torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"partial download")
    with pytest.raises(
        CheckpointError, match=f"cached weights at {cached} could not be read.*delete the file"
    ):
        download_weights("resnet34", "IMAGENET1K_V1")


def test_pretrained_weights_have_1000_classes(no_network):
    with pytest.raises(
        ArchitectureMismatchError, match="DEFAULT weights for resnet50 have 1000 classes.*num_classes=10"
    ):
        resolve_model("resnet50", "DEFAULT", num_classes=10)
    assert no_network == [], "must fail before downloading"
