"""The named starting points of a config (`--preset`) and the smoke-test shrink every script shares."""

from __future__ import annotations

from typing import Any

_VOC2007_DEV: dict[str, Any] = {
    "data.benchmark": "voc", "data.voc_year": 2007, "data.voc_train_set": "devtrain", "data.voc_test_set": "devtest",
    "data.val_size": 300, "model.backbone": "mobilenet_v2", "model.weights": "imagenet", "model.profile": "frozen",
    "optim.step_head": 12, "optim.step_tail": 24,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Embedded default: generated data, tiny CNN, CPU-sized; the whole pipeline in minutes.
    "synthetic": {
        "data.benchmark": "synthetic", "data.longtail": "pareto", "data.max_count": 800, "data.pareto_b": 6.0,
        "data.val_size": 400, "data.image_size": 64, "data.crop_scale_min": 0.5, "data.num_workers": 0,
        "data.synthetic_images": 3000,
        "model.backbone": "tiny", "model.weights": "none", "model.profile": "finetune", "model.feat_dim": 128,
        "model.log_softmax_feature": False, "model.label_embeddings": "random",
        # A CNN trained from scratch needs larger steps than the paper's pretrained ResNet-50 (1e-4 / 1e-3).
        "optim.lr_trunk": 3e-3, "optim.lr_feature": 3e-3, "optim.lr_classifier": 3e-3,
        "optim.step_head": 24, "optim.step_tail": 18,
        "optim.step_balanced_feature": 18, "optim.step_balanced_other": 24,
        "train.epochs": 30, "train.batch_size": 32, "train.log_interval": 10,
    },
    # PLT-VOC (max 1400, b 12) with the released per-model decays for VOC (head 12, tail 24).
    "plt-voc": {
        "data.benchmark": "plt-voc", "data.max_count": 1400, "data.pareto_b": 12.0,
        "optim.step_head": 12, "optim.step_tail": 24,
    },
    # PLT-COCO (max 1400, b 10) with the released per-model decays for COCO (head 24, tail 12).
    "plt-coco": {
        "data.benchmark": "plt-coco", "data.max_count": 1400, "data.pareto_b": 10.0,
        "optim.step_head": 24, "optim.step_tail": 12,
    },
    # Real photos on a CPU: a VOC2007 tree with the sets devtrain (train pool) / devtest (test), frozen ImageNet
    # MobileNetV2 features cached once, 40 % missing labels; the released per-model decays for VOC.
    "voc2007-dev": _VOC2007_DEV | {"data.longtail": "none"},
    # The same pool Pareto-subsampled so that many / medium / few classes all exist (PLT's long tail, on real photos).
    "voc2007-dev-lt": _VOC2007_DEV | {"data.longtail": "pareto", "data.max_count": 600, "data.pareto_b": 6.0},
}
# The same with ImageNet EfficientNet-Lite2 from timm (top-1 77.6 %, above the paper's ResNet-50) at its own 260 px,
# bicubic, mean = std = 0.5. Its weights: timm's hub file, or offline `model.weights=<tf_efficientnet_lite2 .pth>`.
_EFFNET_LITE2 = {"model.backbone": "timm/tf_efficientnet_lite2", "data.image_size": 260}
PRESETS |= {"voc2007-dev-effnet": PRESETS["voc2007-dev"] | _EFFNET_LITE2,
            "voc2007-dev-lt-effnet": PRESETS["voc2007-dev-lt"] | _EFFNET_LITE2}

# Every script's `--smoke-test` (and the test suite): the synthetic pipeline shrunk to seconds on a CPU.
SMOKE_OVERRIDES: dict[str, Any] = {
    "data.benchmark": "synthetic", "data.synthetic_images": 160, "data.synthetic_test_images": 64,
    "data.val_size": 32, "data.max_count": 60, "data.image_size": 32, "data.num_workers": 0,
    "model.backbone": "tiny", "model.weights": "none", "model.feat_dim": 32,
    "train.epochs": 2, "train.batch_size": 16, "engine.device": "cpu",
}
