"""timm trunks (`model.backbone=timm/<name>`): the EfficientNet-Lite2 file from `../shared/data/weights/` loads
strictly and classifies VOC photos as ImageNet does, the trunk's own preprocessing reaches the image path and the
feature cache (a timm and a torchvision trunk through one code path), and mistakes name themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from comic.config import ModelConfig, load_config
from comic.data.build import ensure_benchmark
from comic.data.features import ensure_features, feature_folder
from comic.data.images import eval_transform, load_eval_pixels, trunk_preprocess
from comic.data.reader import load_benchmark
from comic.device import runtime
from comic.models.backbone import BackboneWeightsError, build_trunk, weights_id

LITE2 = "tf_efficientnet_lite2-5b71a564.pth"
# ImageNet classes 751 'racer' and 339 'sorrel': a car (VOC 000012) and a horse (VOC 000017).
PHOTOS = {"000012.jpg": 751, "000017.jpg": 339}


@pytest.fixture
def lite2(shared_data):
    path = shared_data / "weights" / LITE2
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def _photo(shared, name):
    return shared / "voc2007-dev" / "VOCdevkit" / "VOC2007" / "JPEGImages" / name


def test_the_lite2_file_loads_strictly_and_ranks_voc_photos_with_timms_preprocessing(lite2, shared_data):
    torch.set_num_threads(2)
    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    model.load_state_dict(torch.load(lite2, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    # Our path: the trunk from the file (no classifier), pixels by `trunk_preprocess`, the file's classifier on top.
    cfg = ModelConfig(backbone="timm/tf_efficientnet_lite2", weights=str(lite2))
    trunk, width = build_trunk(cfg)
    prep = trunk_preprocess(cfg, 260)
    assert width == 1280 and (prep.resize, prep.interpolation, prep.mean) == (292, "bicubic", (0.5, 0.5, 0.5))
    for name, expected in PHOTOS.items():
        path = _photo(shared_data, name)
        with torch.inference_mode():
            theirs = model(transform(Image.open(path).convert("RGB"))[None])
            pixels = torch.from_numpy(np.array(load_eval_pixels(path, prep))).permute(2, 0, 1)
            ours = model.classifier(trunk.eval()(eval_transform(prep)(pixels)[None]))
        assert int(theirs.argmax()) == expected, name
        assert int(ours.argmax()) == expected, name


@pytest.mark.parametrize("backbone", ["timm/test_efficientnet", "mobilenet_v3_small"])
def test_timm_and_torchvision_trunks_cache_features_through_one_path(backbone, smoke_overrides, tmp_path):
    """The cached evaluation features are the trunk applied to the trunk's own pixels; the recipe in the key."""
    cfg = load_config("synthetic", smoke_overrides | {
        "model.profile": "frozen", "model.backbone": backbone, "model.weights": "none", "data.feature_views": 1,
        "data.cache_dir": str(tmp_path / "data")})
    bench = load_benchmark(ensure_benchmark(cfg.data))
    cache = ensure_features(bench, cfg, runtime(cfg.engine))
    prep = trunk_preprocess(cfg.model, cfg.data.image_size)
    torch.manual_seed(0)  # the cache's random trunk ('none') is drawn from seed 0
    trunk, width = build_trunk(cfg.model)
    rows = cache.rows("val")[:4]
    pixels = [torch.from_numpy(np.array(load_eval_pixels(bench.val.paths[r], prep))).permute(2, 0, 1) for r in rows]
    with torch.inference_mode():
        direct = trunk.eval()(torch.stack([eval_transform(prep)(p) for p in pixels]))
    assert cache.width == width
    np.testing.assert_allclose(np.asarray(cache.arrays["val"][:4], np.float32), direct.numpy(), rtol=1e-2, atol=1e-2)
    recipe = json.loads((feature_folder(bench, cfg) / "meta.json").read_text())["recipe"]
    if backbone.startswith("timm/"):
        data = timm.models.get_pretrained_cfg("test_efficientnet")
        assert recipe["preprocess"]["interpolation"] == data.interpolation == "bicubic"
        assert recipe["preprocess"]["mean"] == list(data.mean)
        assert recipe["preprocess"]["resize"] == int(cfg.data.image_size / data.crop_pct)
    else:
        assert "preprocess" not in recipe and prep.interpolation == "bilinear"  # torchvision's recipe, as before


def test_unknown_timm_models_and_weights_name_themselves(tmp_path):
    with pytest.raises(BackboneWeightsError, match="timm has no model 'tf_efficientnet_lite9'; did you mean"):
        build_trunk(ModelConfig(backbone="timm/tf_efficientnet_lite9", weights="none"))
    bad = tmp_path / "other.pth"
    torch.save({"conv_stem.weight": torch.zeros(1)}, bad)
    with pytest.raises(BackboneWeightsError, match="does not fit timm/test_efficientnet"):
        build_trunk(ModelConfig(backbone="timm/test_efficientnet", weights=str(bad)))
    assert weights_id(ModelConfig(backbone="timm/tf_efficientnet_lite2", weights="imagenet")) == \
        "timm:timm/tf_efficientnet_lite2.in1k"
