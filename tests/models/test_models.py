"""Models (Eqs. 7-10, profiles, backbones), parameter groups, gradient routing and every ablation switch."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from comic.config import load_config
from comic.losses import ComicCriterion
from comic.models import BackboneWeightsError, BaselineNet, ComicNet, ComicOutput, build_trunk
from comic.models.layers import NormalizedClassifier

NUM_CLASSES = 5
COUNTS = torch.tensor([300.0, 80.0, 25.0, 9.0, 2.0])
BASE = ["model.feat_dim=16", "model.backbone=tiny", "model.weights=none"]

# The COMIC ablations the scripts run, each one override set of the `comic` method (README switch table).
SWITCHES = {
    "full": [],
    "no_rlc": ["rlc.enabled=false"],
    "no_mfm": ["mfm.enabled=false"],
    "no_htb": ["htb.enabled=false"],
    "pn_only": ["mfm.use_ht=false"],
    "ht_only": ["mfm.use_pn=false"],
    "static_distribution": ["rlc.distribution=static"],
    "no_attention": ["model.attention=false"],
    "no_nc": ["model.normalized_classifier=false"],
    "no_amv": ["model.moving_vector=false"],
    "no_dl": ["optim.per_model_decay=false"],
    "groups_2": ["model.groups=2"],
    "profile_released": ["model.profile=released", "model.log_softmax_feature=true"],
    "profile_finetune": ["model.profile=finetune"],
    "htb_literal": ["htb.variant=literal"],
    "attention_eval_only": ["model.attention_in_training=false", "model.attention_residual=0.1"],
    "paper_form": ["mfm.class_weight=false", "mfm.clip=0", "rlc.margin=0", "rlc.class_mean=running",
                   "rlc.normalizer=corrected", "model.alpha_tde=1"],
}


def _setup(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config("synthetic", BASE + list(overrides))
    net, crit = ComicNet(cfg.model, NUM_CLASSES), ComicCriterion.from_config(cfg, COUNTS)
    crit.start_epoch(1)
    images = torch.randn(6, 3, 32, 32)
    observed = (torch.rand(6, NUM_CLASSES) < 0.4).float()
    return cfg, net, crit, images, observed


def _params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", list(SWITCHES))
def test_every_switch_runs_forward_and_backward(name):
    cfg, net, crit, images, observed = _setup(*SWITCHES[name])
    out = net(images)
    assert isinstance(out, ComicOutput) and all(z.shape == (6, NUM_CLASSES) for z in out)
    total, parts = crit(out, observed)
    total.backward()
    assert torch.isfinite(total)
    for group in net.param_groups(cfg.optim):
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if group["name"] == "balanced/attention" and not cfg.model.attention_in_training:
            assert not grads  # released code: the attention is used only at evaluation
            continue
        assert grads and all(torch.isfinite(g).all() for g in grads), group["name"]


def test_gradient_routing_between_the_three_models():
    _, net, crit, images, observed = _setup("model.profile=finetune")
    losses, _ = crit.model_losses(net(images), observed)
    own = net.trunks.own
    head_tail = _params(net.head) + _params(net.tail) + _params(own["head"]) + _params(own["tail"])
    balanced = _params(net.balanced) + _params(net.attention) + _params(own["balanced"])
    from_balanced = torch.autograd.grad(losses["balanced"], head_tail, allow_unused=True, retain_graph=True)
    assert all(g is None for g in from_balanced)  # detached attention keys, HTB teachers and kappa
    head_tail_loss = losses["head"] + losses["tail"]
    from_head_tail = torch.autograd.grad(head_tail_loss, balanced, allow_unused=True, retain_graph=True)
    assert all(g is None for g in from_head_tail)
    alone = torch.autograd.grad(head_tail_loss, head_tail, retain_graph=True)
    sum(losses.values()).backward()  # one backward of the full loss: head / tail .grad are their own terms' only
    for param, expected in zip(head_tail, alone, strict=True):
        torch.testing.assert_close(param.grad, expected)
    assert all(p.grad is not None for p in _params(own["balanced"]))


def test_param_groups_cover_each_trainable_parameter_once():
    cfg, net, *_ = _setup("model.profile=finetune")
    groups = net.param_groups(cfg.optim)
    names = [g["name"] for g in groups]
    assert names == ["head/trunk", "head/feature", "head/classifier", "tail/trunk", "tail/feature",
                     "tail/classifier", "balanced/trunk", "balanced/feature", "balanced/classifier",
                     "balanced/attention"]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters() if p.requires_grad)
    by_name = {g["name"]: g for g in groups}
    o = cfg.optim
    assert by_name["head/feature"]["step_size"] == o.step_head
    assert by_name["tail/classifier"]["step_size"] == o.step_tail
    assert by_name["balanced/feature"]["step_size"] == o.step_balanced_feature
    assert by_name["balanced/attention"]["step_size"] == o.step_balanced_other
    assert by_name["head/trunk"]["lr"] == o.lr_trunk and by_name["tail/classifier"]["lr"] == o.lr_classifier
    assert {g["model"] for g in groups} == {"head", "tail", "balanced"}
    torch.optim.Adam(groups)  # the metadata keys are accepted by torch optimizers
    no_dl = {g["name"]: g["step_size"] for g in net.param_groups(load_config(
        "synthetic", ["optim.per_model_decay=false"]).optim)}
    assert no_dl["head/feature"] == no_dl["tail/trunk"] == o.step_balanced_feature
    assert no_dl["head/classifier"] == no_dl["tail/classifier"] == o.step_balanced_other


def test_released_profile_freezes_trunk_but_bn_statistics_adapt():
    cfg, net, *_ = _setup("model.profile=released")
    trunk = net.trunks.shared  # one trunk for the three models
    assert not net.trunks.own and sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 3
    assert not any(p.requires_grad for p in trunk.parameters())
    assert "balanced/trunk" not in [g["name"] for g in net.param_groups(cfg.optim)]
    bn = next(m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    net.train()
    net(torch.randn(4, 3, 32, 32) + 3.0)
    assert not torch.equal(bn.running_mean, before)
    baseline = BaselineNet(cfg.model, NUM_CLASSES)
    assert [g["name"] for g in baseline.param_groups(cfg.optim)] == ["baseline/feature", "baseline/classifier"]
    assert baseline(torch.randn(2, 3, 32, 32)).logits.shape == (2, NUM_CLASSES)


def test_moving_vector_updates_in_training_only_and_is_saved():
    cfg, net, _, images, _ = _setup()
    net.eval()
    out = net(images)
    torch.testing.assert_close(out.z_h_hat, out.z_h)  # e = 0 before any training step: no shift, no NaN
    net.train()
    f = net.head.features(net.trunks(images)["head"])
    net(images)
    torch.testing.assert_close(net.head.moving.e, f.mean(0))  # Eq. 7 from e = 0: mu * 0 + mean(f)
    net(images)
    torch.testing.assert_close(net.head.moving.e, (1 + cfg.model.mu) * f.mean(0))
    e = net.head.moving.e.clone()
    net.eval()
    net(images)
    assert torch.equal(net.head.moving.e, e)
    assert "head.moving.e" in net.state_dict() and "tail.moving.e" in net.state_dict()


def test_normalized_classifier_matches_eq_9_and_10():
    torch.manual_seed(1)
    clf = NormalizedClassifier(feat_dim=6, num_classes=3, rho=16.0, eta=1 / 32, groups=2)
    f, e = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    clf.double()
    z, z_hat = clf(f, e, shift=2.0)
    expected, expected_hat = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    for k in (slice(0, 3), slice(3, 6)):
        f_k = f[:, k] / f[:, k].norm(dim=1, keepdim=True)
        w_k = clf.weight[:, k].detach() / (clf.weight[:, k].detach().norm(dim=1, keepdim=True) + 1 / 32)
        e_k = e[k] / e[k].norm()
        cos = f_k @ e_k
        expected += 16.0 / 2 * f_k @ w_k.T
        expected_hat += 16.0 / 2 * (f_k + 2.0 * cos[:, None] * e_k) @ w_k.T
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(z_hat, expected_hat)


def test_forward_is_capturable_without_graph_breaks():
    _, net, crit, images, observed = _setup("rlc.class_mean=running")
    step = torch.compile(lambda x, y: crit(net(x), y), backend="eager", fullgraph=True)  # no .item(), no data branch
    total, parts = step(images, observed)
    total.backward()
    assert torch.isfinite(total) and crit.rlc["b"].seen.item() == len(images)


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_backbones_without_weights(name, width):
    trunk, out_width = build_trunk(load_config("synthetic", [f"model.backbone={name}", "model.weights=none"]).model)
    assert out_width == width
    if name == "resnet18":
        assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, width)


def test_backbone_weights_from_a_state_dict_file(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")  # a full classifier state dict: its fc is ignored
    cfg = load_config("synthetic", ["model.backbone=resnet18", f"model.weights={tmp_path / 'r18.pth'}"]).model
    trunk, _ = build_trunk(cfg)
    torch.testing.assert_close(trunk.conv1.weight, source.conv1.weight)
    with pytest.raises(BackboneWeightsError, match="neither"):
        build_trunk(load_config("synthetic", [f"model.weights={tmp_path / 'missing.pth'}"]).model)


def test_imagenet_weights_offline_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # the network boundary
    cfg = load_config("synthetic", ["model.backbone=resnet18", "model.weights=imagenet"]).model
    with pytest.raises(BackboneWeightsError, match=r"model\.weights=/path/to/resnet18-.*\.pth") as err:
        build_trunk(cfg)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(BackboneWeightsError, match="no ImageNet weights"):
        build_trunk(load_config("synthetic", ["model.weights=imagenet"]).model)  # tiny


def test_groups_must_divide_the_feature_width():
    with pytest.raises(ValueError, match="divisible"):
        ComicNet(load_config("synthetic", BASE + ["model.groups=3"]).model, NUM_CLASSES)
    net = ComicNet(load_config("synthetic", BASE + ["model.groups=4"]).model, NUM_CLASSES)
    assert torch.isfinite(net(torch.randn(2, 3, 16, 16)).logits).all()


@pytest.mark.parametrize("name, width", [("mobilenet_v2", 1280), ("mobilenet_v3_small", 1024),
                                         ("efficientnet_b0", 1280), ("convnext_tiny", 768), ("resnet18", 512)])
def test_any_torchvision_classifier_gives_its_penultimate_features(name, width):
    """The classifier is found whatever it is called (fc, classifier[1], classifier[3], classifier[2]) and removed
    with its Dropout: the trunk returns the input of the last Linear layer."""
    model = torchvision.models.get_model(name, weights=None).eval()
    trunk, out_width = build_trunk(load_config("synthetic", [f"model.backbone={name}", "model.weights=none"]).model)
    trunk.load_state_dict({k: v for k, v in model.state_dict().items() if k in trunk.state_dict()})
    trunk.eval()
    captured = {}
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.register_forward_hook(lambda module, inputs, output: captured.setdefault("x", inputs[0]))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(images)
        features = trunk(images)
    assert out_width == width == features.shape[1]
    torch.testing.assert_close(features, captured["x"])


def test_unknown_backbone_names_the_closest():
    with pytest.raises(BackboneWeightsError, match="did you mean resnet50"):
        build_trunk(load_config("synthetic", ["model.backbone=resnt50"]).model)


def test_imagenet_mobilenet_v2_loads_from_the_hub_cache_offline(offline_imagenet):
    cfg = load_config("synthetic", ["model.backbone=mobilenet_v2", "model.weights=imagenet"]).model
    trunk, width = build_trunk(cfg)
    state = torch.load(offline_imagenet, map_location="cpu", weights_only=True)
    assert width == 1280 and state["classifier.1.weight"].shape == (1000, 1280)
    torch.testing.assert_close(trunk.features[0][0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(trunk.features[18][1].running_var, state["features.18.1.running_var"])


def _three_trunks(cfg, width_source: ComicNet) -> ComicNet:
    """The earlier released design: three frozen trunks (profile finetune, frozen by hand), other weights copied."""
    three = ComicNet(load_config("synthetic", BASE_PRETRAINED + ["model.profile=finetune"]).model, NUM_CLASSES)
    for trunk in three.trunks.own.values():
        trunk.requires_grad_(False)
    heads = {k: v for k, v in width_source.state_dict().items() if not k.startswith("trunks.")}
    missing, unexpected = three.load_state_dict(heads, strict=False)
    assert not unexpected and all(k.startswith("trunks.") for k in missing)
    return three


BASE_PRETRAINED = ["model.backbone=mobilenet_v2", "model.weights=imagenet", "model.feat_dim=32"]


@pytest.mark.parametrize("train", [True, False])
def test_shared_trunk_equals_three_trunks(offline_imagenet, train):
    """One shared trunk forward == three identical frozen trunks: logits, losses and updated BatchNorm statistics."""
    cfg = load_config("synthetic", BASE_PRETRAINED + ["model.profile=released"])
    torch.manual_seed(0)
    shared = ComicNet(cfg.model, NUM_CLASSES)
    three = _three_trunks(cfg, shared)
    images = torch.randn(4, 3, 64, 64)
    observed = (torch.rand(4, NUM_CLASSES) < 0.4).float()
    outputs, losses = [], []
    for net in (shared, three):
        net.train(train)
        torch.manual_seed(1)  # the attention's dropout draws the same mask in both
        out = net(images)
        outputs.append(out)
        losses.append(ComicCriterion.from_config(cfg, COUNTS)(out, observed)[0])
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(losses[0], losses[1])
    stats = {k: v for k, v in shared.trunks.shared.state_dict().items() if "running" in k}
    assert stats
    for trunk in three.trunks.own.values():
        for key, value in trunk.state_dict().items():
            if "running" in key:
                torch.testing.assert_close(value, stats[key])
    imagenet = build_trunk(cfg.model)[0].state_dict()
    moved = any(not torch.equal(value, imagenet[key]) for key, value in stats.items() if "num_batches" not in key)
    assert moved == train  # train mode updated the statistics (identically), eval mode left ImageNet's
