import pytest
import torch

from fer_core.models import GroupHeads, count_flops, count_parameters, create_model, list_models


def test_registry_has_three_architectures():
    assert list_models() == ["main", "variant1", "variant2"]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown model 'resnet'.*main"):
        create_model("resnet")


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_no_nan_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=1)
    x = torch.randn(3, 1, 48, 48)
    logits = model(x)
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_global_pooling_accepts_other_sizes(name):
    model = create_model(name, num_classes=7).eval()
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 7)


def test_parameter_and_flop_counts_are_ordered_as_designed():
    params = {n: count_parameters(create_model(n)) for n in list_models()}
    flops = {n: count_flops(create_model(n)) for n in list_models()}
    # variant1 is the deeper one: more layers, more parameters and compute than main
    assert params["variant1"] > params["main"] and flops["variant1"] > flops["main"]
    # variant2's larger kernels cost more compute per image than main
    assert flops["variant2"] > flops["main"]
    convs = {n: [m for m in create_model(n).modules() if isinstance(m, torch.nn.Conv2d)]
             for n in list_models()}
    assert len(convs["variant1"]) > len(convs["main"])
    kernels = {n: max(m.kernel_size[0] for m in convs[n]) for n in list_models()}
    assert kernels["variant2"] > kernels["main"]


@pytest.mark.parametrize("name", list_models())
def test_width_scales_every_convolution(name):
    def channels(model):
        return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    base, wide = channels(create_model(name)), channels(create_model(name, width=2.0))
    assert wide == [2 * c for c in base]
    assert create_model(name, width=2.0)(torch.zeros(2, 1, 48, 48)).shape == (2, 4)
    with pytest.raises(ValueError, match="width"):
        create_model(name, width=0.0)


@pytest.mark.parametrize("name", list_models())
def test_without_stem_pooling_the_same_weights_see_every_stage_at_twice_the_resolution(name):
    pooled, full = create_model(name), create_model(name, stem_pool=False)
    def shapes(model):
        return {k: v.shape for k, v in model.state_dict().items()}

    assert shapes(pooled) == shapes(full)
    sizes = []
    for model in (pooled, full):
        model.stages[0].register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[-2:]))
        assert model(torch.zeros(2, 1, 48, 48)).shape == (2, 4)
    assert sizes == [(24, 24), (48, 48)]
    full.load_state_dict(pooled.state_dict())  # the same parameters, so a checkpoint moves between them
    assert count_flops(full) > 3 * count_flops(pooled)


@pytest.mark.parametrize("name", list_models())
def test_group_heads_predict_the_sum_of_the_groups_classifiers_and_collapse_to_the_plain_model(name):
    torch.manual_seed(0)
    heads = GroupHeads(create_model(name, num_classes=4 * 3), num_classes=4, n_groups=3).eval()
    x = torch.randn(5, 1, 48, 48)
    raw = heads.net(x)  # the wrapped network's 12 outputs: group 0's four classes, then group 1's, ...
    per_group = heads.group_logits(x)
    assert torch.equal(per_group[:, 1], raw[:, 4:8])
    want = raw[:, 0:4] + raw[:, 4:8] + raw[:, 8:12]
    assert torch.allclose(heads(x), want, atol=1e-5)
    plain = heads.collapse().eval()
    assert not isinstance(plain, GroupHeads) and plain.num_classes == 4
    assert torch.allclose(plain(x), want, atol=1e-4)
    # the collapsed weights load into the registered architecture, as saved models are rebuilt
    rebuilt = create_model(name, num_classes=4)
    rebuilt.load_state_dict(plain.state_dict())
    assert torch.allclose(rebuilt.eval()(x), want, atol=1e-4)


def test_group_heads_refuse_a_network_of_the_wrong_size():
    with pytest.raises(ValueError, match="10 outputs, expected 4 classes x 3 groups"):
        GroupHeads(create_model("main", num_classes=10), num_classes=4, n_groups=3)


def test_group_heads_with_an_empty_cell_vote_only_among_the_classes_each_group_saw():
    torch.manual_seed(0)
    cells = torch.tensor([[True, True, True, True], [True, False, True, False]])  # group 1 lacks 1 and 3
    heads = GroupHeads(create_model("main", num_classes=8), num_classes=4, n_groups=2, cells=cells).eval()
    x = torch.randn(5, 1, 48, 48)
    g = heads.group_logits(x)
    own = g[:, 1, [0, 2]] - g[:, 1, [0, 2]].mean(1, keepdim=True)  # group 1, centred over classes 0 and 2
    want = g[:, 0].clone()
    want[:, [0, 2]] += own
    assert torch.allclose(heads(x), want, atol=1e-5)
    assert torch.allclose(heads.mix[1] @ torch.ones(4), torch.zeros(4))  # blind to a per-image shift
    assert torch.allclose(heads.collapse().eval()(x), want, atol=1e-4)
    filled = torch.ones(2, 4, dtype=torch.bool)
    assert GroupHeads(create_model("main", num_classes=8), 4, 2, cells=filled).mix is None
