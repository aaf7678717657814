import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fer_core.config import TrainConfig
from fer_core.models import create_model, reverse_grad
from fer_core.training import (
    Trainer,
    augment,
    balancing_weights,
    erase_patches,
    fit,
    input_stats,
    unit_pixels,
)
from tests.helpers import bar_images

FAST = dict(epochs=3, batch_size=16, lr=3e-3, patience=10)


def test_fit_learns_and_calls_back_every_epoch():
    x, y = bar_images(160, seed=0)
    xv, yv = bar_images(40, seed=1)
    seen = []
    result = fit(TrainConfig(**FAST), x, y, xv, yv, 4, on_epoch_end=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [0, 1, 2]
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds"} <= set(seen[0][1])
    assert max(m["val_accuracy"] for _, m in seen) > 0.6  # chance is 0.25
    assert result.best_epoch == int(np.argmax([m["val_macro_f1"] for _, m in seen]))


def test_callback_returning_false_stops_training():
    x, y = bar_images(48)
    result = fit(TrainConfig(**FAST), x, y, x[:16], y[:16], 4, on_epoch_end=lambda e, m: False)
    assert len(result.history) == 1


def test_early_stopping_after_patience_without_improvement():
    x, y = bar_images(48)
    tr = Trainer(TrainConfig(epochs=50, batch_size=16, patience=2), x, y, x[:16], y[:16], 4)
    tr.best_score = 2.0  # nothing can beat a macro-F1 of 2
    while not tr.done:
        tr.step()
    assert tr.epoch == 2


def test_same_seed_same_history_other_seed_differs():
    x, y = bar_images(48)
    runs = [fit(TrainConfig(epochs=2, batch_size=16, seed=s), x, y, x[:16], y[:16], 4) for s in (1, 1, 2)]
    losses = [[h["train_loss"] for h in r.history] for r in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_augment_is_per_image_and_off_at_zero_strength():
    x = torch.rand(8, 1, 48, 48)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, 0.0, gen), x)
    same = x[:1].repeat(8, 1, 1, 1)
    out = augment(same, 1.0, gen)
    assert out.shape == same.shape
    diffs = [(out[0] - out[i]).abs().mean().item() for i in range(1, 8)]
    assert min(diffs) > 0  # every copy was transformed differently


def test_erase_blanks_one_rectangle_per_chosen_image():
    x = torch.ones(400, 1, 48, 48)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(erase_patches(x, 0.0, gen), x)
    out = erase_patches(x, 0.5, gen)
    erased = out == 0
    hit = erased.flatten(1).any(1)
    assert 150 < int(hit.sum()) < 250  # about half of 400 images (binomial sd 10)
    boxes = set()
    for img in erased[hit, 0]:
        rows, cols = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert img.sum() == (bottom - top) * (right - left)  # one solid rectangle, nothing else
        assert 0.015 <= img.sum().item() / 48**2 <= 0.3  # area 2-25% of the image, up to rounding
        boxes.add((int(top), int(left), int(bottom), int(right)))
    assert len(boxes) > 0.9 * int(hit.sum())  # each image drew its own rectangle
    assert torch.equal(out[~hit], x[~hit])
    # in `augment` it comes on top of the jitter, and is drawn even with the jitter off
    assert (augment(x[:64], 0.0, gen, erase=1.0) == 0).flatten(1).any(1).all()


def test_ema_weights_are_the_moving_average_and_are_what_is_kept():
    x, y = bar_images(64)
    cfg = TrainConfig(epochs=2, batch_size=16, ema=0.3, val_fraction=0.0)
    tr = Trainer(cfg, x, y, x[:0], y[:0], 4)
    seen = []  # the trained weights after every optimizer step
    tr.optimizer.register_step_post_hook(
        lambda *_: seen.append({k: v.detach().clone() for k, v in tr.model.state_dict().items()}))
    while not tr.done:
        tr.step()
    # weights and batch-norm statistics (batch counters are not averaged: they are not used here); the
    # decay warms up as min(decay, (1 + n) / (10 + n)) after n updates: 0.18, 0.25, then capped at 0.3
    want = {k: v for k, v in seen[0].items() if v.is_floating_point()}
    for n, state in enumerate(seen[1:], start=1):
        d = min(0.3, (1 + n) / (10 + n))
        want = {k: d * v + (1 - d) * state[k] for k, v in want.items()}
    kept = tr.result().model.state_dict()
    assert len(seen) == 2 * tr.steps_per_epoch
    for k, v in want.items():
        assert torch.allclose(kept[k], v, atol=1e-6), k
    assert not torch.allclose(kept["head.3.weight"], seen[-1]["head.3.weight"])  # not the last weights


def test_ema_with_a_long_horizon_still_learns_in_a_short_run():
    # without the warm-up, a decay of 0.999 over 60 steps keeps 94% of the random initial weights
    x, y = bar_images(160, seed=0)
    xv, yv = bar_images(40, seed=1)
    result = fit(TrainConfig(epochs=6, batch_size=16, ema=0.999), x, y, xv, yv, 4)
    assert max(h["val_accuracy"] for h in result.history) > 0.6  # chance is 0.25


def test_ema_and_erase_resume_exactly():
    x, y = bar_images(64)
    cfg = TrainConfig(epochs=4, batch_size=16, ema=0.9, erase=0.5)
    full = fit(cfg, x, y, x[:16], y[:16], 4)
    first = Trainer(cfg, x, y, x[:16], y[:16], 4)
    first.step()
    first.step()
    state, rng = first.state_dict(), torch.get_rng_state()
    resumed = Trainer(cfg, x, y, x[:16], y[:16], 4)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    while not resumed.done:
        resumed.step()
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    plain = fit(TrainConfig(epochs=4, batch_size=16), x, y, x[:16], y[:16], 4)
    assert [h["val_loss"] for h in plain.history] != [h["val_loss"] for h in full.history]


def test_balancing_weights_equalise_classes_and_their_known_groups():
    # class 0: one F, three M, two of unknown group; class 1: two F and no M (an emptied cell)
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    g = np.array(["F", "M", "M", "M", "unknown", "unknown", "F", "F"])
    w = balancing_weights(y, g)
    # by hand: each class gets half of the total 8; class 0's unknown images keep their natural 2/6 of
    # its 4 (2/3 each), F and M split the other 8/3 (4/3 for the one F, 4/9 for each M); class 1's two F
    # images share its 4
    np.testing.assert_allclose(w, [4 / 3, 4 / 9, 4 / 9, 4 / 9, 2 / 3, 2 / 3, 2, 2])
    # balancing cells alone would have given class 0 three times class 1's weight (3 cells against 1)
    np.testing.assert_allclose(balancing_weights(y, None), [2 / 3] * 6 + [2, 2])


@pytest.mark.parametrize("mitigation", ["resample", "reweight", "groupdro", "groupheads", "adversary"])
def test_mitigations_train_and_need_groups(mitigation):
    x, y = bar_images(64)
    g = np.where(np.arange(64) < 48, "M", "F")
    cfg = TrainConfig(epochs=1, batch_size=16, mitigation=mitigation)
    result = fit(cfg, x, y, x[:16], y[:16], 4, train_groups=g)
    assert np.isfinite(result.history[0]["train_loss"])
    with pytest.raises(ValueError, match="needs the group"):
        fit(cfg, x, y, x[:16], y[:16], 4)


def test_resampling_draws_groups_evenly():
    x, y = bar_images(200)
    y[:] = 0
    g = np.where(np.arange(200) < 180, "M", "F")  # 9:1
    tr = Trainer(TrainConfig(epochs=1, batch_size=16, mitigation="resample"), x, y, x[:4], y[:4], 4, g)
    order = tr.epoch_order().numpy()
    share_f = (g[order] == "F").mean()
    assert 0.4 < share_f < 0.6


def test_group_dro_upweights_the_worse_group():
    x, y = bar_images(64)
    g = np.where(np.arange(64) % 2 == 0, "A", "B")
    tr = Trainer(TrainConfig(epochs=1, batch_size=64, mitigation="groupdro", dro_eta=1.0),
                 x, y, x[:4], y[:4], 4, g)
    logits = torch.zeros(64, 4)
    logits[torch.arange(64), tr.y] = 5.0  # right for everyone ...
    logits[1::2] = 0.0  # ... except group B, which has the higher loss
    tr.loss(logits, torch.arange(64))
    assert tr.q[1] > tr.q[0]


def test_mixup_splits_the_loss_between_the_two_labels_and_resumes_exactly():
    x, y = bar_images(64)
    cfg = TrainConfig(epochs=4, batch_size=16, mixup=0.4)
    tr = Trainer(cfg, x, y, x[:16], y[:16], 4)
    lams = tr.mix_weights()
    assert lams.shape == (tr.steps_per_epoch,) and ((lams >= 0) & (lams <= 1)).all()
    mixed, perm = tr.mix(tr.x[:16], 0.3)
    assert sorted(perm.tolist()) == list(range(16))
    assert torch.allclose(mixed[0], 0.3 * tr.x[0] + 0.7 * tr.x[perm[0]])
    logits = torch.randn(16, 4)
    ce = torch.nn.functional.cross_entropy
    want = 0.3 * ce(logits, tr.y[:16], label_smoothing=cfg.label_smoothing) + 0.7 * ce(
        logits, tr.y[:16][perm], label_smoothing=cfg.label_smoothing)
    assert torch.isclose(tr.loss(logits, torch.arange(16), perm, 0.3), want, atol=1e-5)

    full = fit(cfg, x, y, x[:16], y[:16], 4)
    first = Trainer(cfg, x, y, x[:16], y[:16], 4)
    first.step()
    first.step()
    state, rng = first.state_dict(), torch.get_rng_state()  # dropout draws from torch's global RNG
    resumed = Trainer(cfg, x, y, x[:16], y[:16], 4)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)  # as study.trainable's checkpoints do
    while not resumed.done:
        resumed.step()
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    no_mix = fit(TrainConfig(epochs=4, batch_size=16), x, y, x[:16], y[:16], 4)
    assert [h["train_loss"] for h in no_mix.history] != [h["train_loss"] for h in full.history]


def test_mixup_parts_keep_their_own_weight_and_group():
    x, y = bar_images(8)
    g = np.array(["A"] * 4 + ["B"] * 4)
    perm = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])  # every image mixed with one of the other group
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.as_tensor(y)] = 6.0  # confident and right about each image's own label
    # reweight: a mixed input's two parts are weighted by their own examples' weights
    rw = Trainer(TrainConfig(mitigation="reweight", label_smoothing=0.0), x, y, x[:2], y[:2], 4, g)
    ce = torch.nn.functional.cross_entropy(logits, rw.y, reduction="none")
    ce_partner = torch.nn.functional.cross_entropy(logits, rw.y[perm], reduction="none")
    w = rw.loss_weights
    want = (0.8 * w * ce).mean() + (0.2 * w[perm] * ce_partner).mean()
    assert torch.isclose(rw.loss(logits, torch.arange(8), perm, 0.8), want, atol=1e-6)
    # groupdro: a pure partner input (lam = 0) counts toward the partner's group only
    cfg = TrainConfig(mitigation="groupdro", dro_eta=1.0, label_smoothing=0.0)
    dro = Trainer(cfg, x, y, x[:2], y[:2], 4, g)
    partner_logits = torch.zeros(8, 4)  # inputs 0-3 are group B's images: read badly (uniform) ...
    partner_logits[4:][torch.arange(4), dro.y[perm][4:]] = 6.0  # ... inputs 4-7, group A's: read well
    dro.loss(partner_logits, torch.arange(8), perm, 0.0)
    assert dro.q[1] > dro.q[0]  # group B is the worse one, though positions 0-3 hold group A's indices


def test_group_heads_score_each_image_with_its_own_groups_classifier():
    x, y = bar_images(6)
    g = np.array(["M", "F", "unknown", "M", "F", "F"])
    tr = Trainer(TrainConfig(mitigation="groupheads", label_smoothing=0.0), x, y, x[:2], y[:2], 4, g)
    assert tr.n_heads == 2  # F and M; an image of unknown group has no classifier of its own
    torch.manual_seed(0)
    logits = torch.randn(6, 2, 4)  # (image, group classifier, class); classifiers in sorted order: F, M
    # unknown: as a test image, each group voting among the classes it has training images of (six images
    # leave cells empty), its logits centred there (a constant per row does not change cross-entropy)
    unknown = torch.zeros(6, 4)
    for k, name in enumerate(["F", "M"]):
        seen = [c for c in range(4) if np.any((g == name) & (y == c))]
        unknown[:, seen] += logits[:, k, seen] - logits[:, k, seen].mean(1, keepdim=True)
    assert len(seen) < 4  # the case where a plain sum would differ
    own = {"F": logits[:, 0], "M": logits[:, 1], "unknown": unknown}
    ce = torch.nn.functional.cross_entropy
    want = torch.stack([ce(own[g[i]][i:i + 1], tr.y[i:i + 1]) for i in range(6)]).mean()
    assert torch.isclose(tr.loss(logits, torch.arange(6)), want, atol=1e-6)
    # with mixup, the partner's part is scored by the partner's classifier
    perm = torch.tensor([1, 0, 3, 2, 5, 4])
    part = torch.stack([ce(own[g[perm[i]]][i:i + 1], tr.y[perm[i]:perm[i] + 1]) for i in range(6)]).mean()
    assert torch.isclose(tr.loss(logits, torch.arange(6), perm, 0.7), 0.7 * want + 0.3 * part, atol=1e-6)


def _trained_bars(mitigation: str) -> tuple[Trainer, np.ndarray, np.ndarray]:
    """A trainer run to the end on bar images with groups F (a third) and M; and the images, groups."""
    x, y = bar_images(160, seed=0)
    xv, yv = bar_images(40, seed=1)
    g = np.where(np.arange(160) % 3 == 0, "F", "M")
    tr = Trainer(TrainConfig(epochs=4, batch_size=16, mitigation=mitigation), x, y, xv, yv, 4, g)
    while not tr.done:
        tr.step()
    assert max(h["val_accuracy"] for h in tr.history) > 0.6  # chance is 0.25
    return tr, x, g


def test_group_heads_learn_and_return_the_summed_classifier_as_a_plain_model():
    tr, x, _ = _trained_bars("groupheads")
    result = tr.result()
    assert result.model.head[-1].out_features == 4 and result.model is not tr.model
    with torch.no_grad():
        want = tr.model.eval().group_logits(tr.x_val).sum(1)  # the trainer's model holds the best weights
        assert torch.allclose(result.model(tr.x_val), want, atol=1e-4)
    with pytest.raises(ValueError, match="no training image has a known 'gender' group"):
        Trainer(TrainConfig(mitigation="groupheads"), x, tr.y.numpy(), x[:4], tr.y[:4].numpy(), 4,
                np.full(160, "unknown"))


def test_group_heads_warn_about_a_group_with_no_training_image_of_a_class(caplog):
    x, y = bar_images(64)
    every_cell = np.where(np.arange(64) % 2 == 0, "F", "M")  # classes are shuffled: both groups in each
    g = every_cell.copy()
    g[(y == 2) & (g == "M")] = "F"  # no man in class 2
    with caplog.at_level("WARNING", logger="fer_core.training"):
        tr = Trainer(TrainConfig(mitigation="groupheads"), x, y, x[:4], y[:4], 4, g)
    assert "['M/class 2']" in caplog.text and "'gender' group / class cells" in caplog.text
    assert tr.model.mix[1, 2].abs().sum() == 0 and tr.model.mix[1, :, 2].abs().sum() == 0  # M: no vote on 2
    caplog.clear()
    with caplog.at_level("WARNING", logger="fer_core.training"):
        Trainer(TrainConfig(mitigation="groupheads"), x, y, x[:4], y[:4], 4, every_cell)
    assert "no training image" not in caplog.text


def test_reverse_grad_is_the_identity_forward_and_flips_the_gradient_backward():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    out = reverse_grad(x, 0.4)
    assert torch.equal(out, x)
    (out * w).sum().backward()
    assert torch.allclose(x.grad, -0.4 * w)


def test_adversary_critic_learns_groups_inside_classes_and_the_features_get_its_gradient_reversed():
    x, y = bar_images(8)
    g = np.array(["F", "M", "unknown", "M", "F", "F", "M", "F"])
    cfg = TrainConfig(mitigation="adversary", adv_weight=0.5, epochs=10)
    tr = Trainer(cfg, x, y, x[:2], y[:2], 4, g)
    assert tr.critic_index.tolist() == [0, 1, -1, 1, 0, 0, 1, 0]  # sorted known groups; unknown: no target
    # the critic is told each image's class, one-hot, or blended as mixup blends the images
    idx, perm = torch.arange(8), torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    onehot = torch.nn.functional.one_hot(tr.y, 4).float()
    assert torch.equal(tr.critic_inputs(idx), onehot)
    assert torch.allclose(tr.critic_inputs(idx, perm, 0.7), 0.7 * onehot + 0.3 * onehot[perm])
    # its loss: cross-entropy on the images of known group only; with mixup, each part its own weight
    critic = torch.randn(8, 2)
    ce = torch.nn.functional.cross_entropy
    known = tr.critic_index >= 0
    want = ce(critic[known], tr.critic_index[known])
    assert torch.isclose(tr.critic_loss(critic, idx), want, atol=1e-6)
    tp = tr.critic_index[perm]
    want_mix = 0.7 * want + 0.3 * ce(critic[tp >= 0], tp[tp >= 0])
    assert torch.isclose(tr.critic_loss(critic, idx, perm, 0.7), want_mix, atol=1e-6)
    # the reversed gradient: 0 at the start, adv_weight * (2 / (1 + e^-10p) - 1) at progress p
    assert tr.critic_scale() == 0.0
    tr.epoch = 5
    assert tr.critic_scale() == pytest.approx(0.5 * (2 / (1 + np.exp(-5.0)) - 1))
    # the network's weights get minus that times the critic's gradient; the critic its own, unchanged
    model = tr.model.eval()
    classes = tr.critic_inputs(idx)

    def grads():
        model.zero_grad()
        inp = torch.cat([model.net.features(tr.x), classes], 1)
        tr.critic_loss(model.critic(inp), idx).backward()
        return ([p.grad.clone() for p in model.net.stages.parameters() if p.grad is not None],
                [p.grad.clone() for p in model.critic.parameters()])

    plain_net, plain_critic = grads()
    model.zero_grad()
    _, crit = model.logits_and_critic(tr.x, classes, 0.3)
    tr.critic_loss(crit, idx).backward()
    net_rev = [p.grad for p in model.net.stages.parameters() if p.grad is not None]
    critic_rev = [p.grad for p in model.critic.parameters()]
    assert len(net_rev) == len(plain_net) > 0
    assert all(torch.allclose(a, -0.3 * b, atol=1e-6) for a, b in zip(net_rev, plain_net, strict=True))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(critic_rev, plain_critic, strict=True))


def test_adversary_learns_and_returns_the_plain_architecture_without_its_critic():
    tr, x, g = _trained_bars("adversary")
    # F is every third image, independent of the bar: knowing the class, the best guess without the
    # features is the overall share, entropy -(1/3 ln 1/3 + 2/3 ln 2/3) = 0.6365 nats
    shares = [(g[tr.y.numpy() == c] == "F").mean() for c in range(4)]
    want = np.mean([-(p * np.log(p) + (1 - p) * np.log(1 - p)) for p in shares])  # classes equal-sized
    assert all(h["critic_chance"] == pytest.approx(want) for h in tr.history)
    assert want == pytest.approx(0.6365, abs=0.01)
    assert all(np.isfinite(h["critic_loss"]) and h["critic_loss"] < h["train_loss"] for h in tr.history)
    result = tr.result()
    plain = create_model("main")
    assert result.model.state_dict().keys() == plain.state_dict().keys()  # no critic left
    with torch.no_grad():
        assert torch.allclose(result.model.eval()(tr.x_val), tr.model.eval()(tr.x_val), atol=1e-5)
    with pytest.raises(ValueError, match="at least two known 'gender' groups"):
        Trainer(TrainConfig(mitigation="adversary"), x, tr.y.numpy(), x[:4], tr.y[:4].numpy(), 4,
                np.where(g == "F", "F", "unknown"))


def test_init_starts_from_a_saved_models_weights_and_keeps_a_fresh_head_for_other_classes(tmp_path, caplog):
    from fer_core.checkpoint import save_model

    x, y = bar_images(48)
    trained = fit(TrainConfig(**FAST), x, y, x[:16], y[:16], 4).model
    path = save_model(tmp_path / "m.pt", trained, arch="main", classes=("a", "b", "c", "d"),
                      input_size=(48, 48), mean=0.5, std=0.2, config={"width": 1.0, "dropout": 0.3})
    saved = {k: v.clone() for k, v in trained.state_dict().items()}
    same = Trainer(TrainConfig(**FAST, init=str(path)), x, y, x[:16], y[:16], 4).model.state_dict()
    assert all(torch.equal(same[k], saved[k]) for k in saved)  # every tensor, the classifier too
    caplog.set_level("INFO")
    three = Trainer(TrainConfig(**FAST, init=str(path)), x, y % 3, x[:16], y[:16] % 3, 3).model.state_dict()
    fresh = [k for k in three if three[k].shape != saved[k].shape]
    assert fresh and all(k.startswith(fresh[0].rsplit(".", 1)[0]) for k in fresh)  # only the last layer
    assert all(torch.equal(three[k], saved[k]) for k in saved if k not in fresh)
    assert f"left fresh: {sorted(fresh)}" in caplog.text
    scratch = Trainer(TrainConfig(**FAST), x, y, x[:16], y[:16], 4).model.state_dict()
    assert not all(torch.equal(scratch[k], saved[k]) for k in saved if saved[k].is_floating_point())


def test_init_names_a_missing_file_and_refuses_another_architecture(tmp_path, monkeypatch):
    from fer_core.checkpoint import save_model

    with pytest.raises(ValueError, match="key 'init' must be a model file saved by study.kfold.*nope.pt"):
        TrainConfig(init="nope.pt")
    path = save_model(tmp_path / "v1.pt", create_model("variant1"), arch="variant1",
                      classes=("a", "b", "c", "d"), input_size=(48, 48), mean=0.5, std=0.2, config={})
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(init="v1.pt")
    assert cfg.init == str(path.resolve())  # absolute, so a trial in another working directory finds it
    x, y = bar_images(32)
    with pytest.raises(ValueError, match="holds a 'variant1' model of width 1.0, but training asks for 'main'"
                       ):
        Trainer(cfg, x, y, x[:8], y[:8], 4)


def test_equalize_spreads_each_images_grey_levels_as_pil_does():
    x, _ = bar_images(6)
    x = (x // 4 + 60).astype(np.uint8)  # dim, low-contrast faces: grey levels 60-117
    got = unit_pixels(torch.from_numpy(x), "equalize").numpy()
    want = np.stack([np.asarray(ImageOps.equalize(Image.fromarray(img))) for img in x]) / 255.0
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (got.max(axis=(1, 2)) == 1.0).all() and (got.min(axis=(1, 2)) < 0.1).all()


def test_image_norm_standardises_each_image_whatever_its_brightness_and_contrast():
    x, _ = bar_images(5)
    x = x // 2 * 2
    dimmer = x // 2 + 20  # half the contrast, another brightness: the same faces
    got = unit_pixels(torch.from_numpy(x), "image").double().numpy()
    np.testing.assert_allclose(got.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(got.std(axis=(1, 2)), 1, atol=1e-5)
    np.testing.assert_allclose(unit_pixels(torch.from_numpy(dimmer), "image").numpy(), got, atol=1e-4)
    flat = unit_pixels(torch.full((1, 8, 8), 77, dtype=torch.uint8), "image")
    assert torch.equal(flat, torch.zeros_like(flat))


@pytest.mark.parametrize("input_norm", ["dataset", "equalize", "image"])
def test_trainer_normalises_its_inputs_with_the_training_images_stats(input_norm):
    x, y = bar_images(40)
    tr = Trainer(TrainConfig(epochs=1, batch_size=16, input_norm=input_norm), x, y, x[:8], y[:8], 4)
    assert abs(float(tr.x.mean())) < 1e-4 and float(tr.x.std()) == pytest.approx(1.0, abs=1e-3)
    if input_norm == "dataset":  # the default keeps the statistics it always had
        assert (tr.mean, tr.std) == (float(x.mean() / 255.0), float(x.std() / 255.0))
    assert input_stats(x, input_norm) == (tr.mean, tr.std)
    tr.step()
    assert tr.result().input_norm == input_norm


@pytest.mark.parametrize("distill", [0.0, 0.3, 1.0])
def test_distillation_targets_blend_the_label_with_the_teachers_probabilities(distill):
    x, y = bar_images(16)
    soft = np.random.default_rng(0).dirichlet(np.ones(4), size=16)
    cfg = TrainConfig(epochs=1, batch_size=8, label_smoothing=0.1, distill=distill)
    tr = Trainer(cfg, x, y, x[:4], y[:4], 4, soft_targets=soft)
    logits, idx = torch.randn(5, 4), torch.tensor([0, 3, 5, 8, 15])
    target = (1 - distill) * np.eye(4)[y[idx]] + distill * soft[idx]
    target = 0.9 * target + 0.1 / 4  # label smoothing spreads a tenth evenly
    want = -(torch.as_tensor(target, dtype=torch.float32) * torch.log_softmax(logits, 1)).sum(1).mean()
    assert float(tr.loss(logits, idx)) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="soft_targets: shape \\(15, 4\\), expected \\(16, 4\\)"):
        Trainer(cfg, x, y, x[:4], y[:4], 4, soft_targets=soft[:15])


def _sam_trainer(**kw) -> Trainer:
    # one batch of the whole set, no augmentation or dropout: one step is a plain function of the weights
    x, y = bar_images(32)
    g = np.where(np.arange(32) % 2 == 0, "A", "B")
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, weight_decay=0.0, schedule="constant",
                      dropout=0.0, aug_strength=0.0, **kw)
    return Trainer(cfg, x, y, x[:4], y[:4], 4, g)


def test_sam_steps_with_the_gradient_taken_at_the_weights_moved_up_the_gradient():
    tr = _sam_trainer(sam=0.05)
    # in float64: float32 convolutions take CPU-dependent kernel paths (on an AMD EPYC the two gradient
    # passes left the step 8e-5 from the reference, on an Intel Xeon within 1e-5)
    tr.model.double()
    tr.x, tr.x_val = tr.x.double(), tr.x_val.double()
    start = copy.deepcopy(tr.model).train()
    model = copy.deepcopy(start)
    params = list(model.parameters())

    def grads() -> list[torch.Tensor]:
        loss = F.cross_entropy(model(tr.x), tr.y, label_smoothing=tr.cfg.label_smoothing)
        return [g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params, strict=True)]

    g1 = grads()
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
    with torch.no_grad():
        for p, g in zip(params, g1, strict=True):
            p.add_(0.05 * g / norm)
    g2 = grads()
    # SGD, Nesterov momentum 0.9, first step: the weights move by lr * (1 + 0.9) * gradient
    want = [p0 - 0.1 * 1.9 * g for p0, g in zip(start.parameters(), g2, strict=True)]
    plain = [p0 - 0.1 * 1.9 * g for p0, g in zip(start.parameters(), g1, strict=True)]
    tr.step()
    got = list(tr.model.parameters())
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, plain, strict=True))
    # batch-norm statistics moved once, by the first pass at the starting weights
    once = copy.deepcopy(start)
    once(tr.x)
    for a, b in zip(tr.model.buffers(), once.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_sam_moves_group_dro_weights_once_per_step_by_the_first_pass():
    with_sam, without = (_sam_trainer(mitigation="groupdro", dro_eta=1.0, sam=s) for s in (0.05, 0.0))
    with_sam.step()
    without.step()
    assert not torch.allclose(without.q, torch.full_like(without.q, 0.5))
    assert torch.allclose(with_sam.q, without.q)
    before = with_sam.q.clone()  # and the loss still moves them after a sam step
    with_sam.loss(torch.randn(32, 4), torch.arange(32))
    assert not torch.allclose(with_sam.q, before)


def test_sam_trains_with_every_mitigation():
    x, y = bar_images(64)
    g = np.where(np.arange(64) % 2 == 0, "A", "B")
    for mitigation in ("none", "reweight", "groupdro", "groupheads", "adversary"):
        result = fit(TrainConfig(epochs=2, batch_size=16, sam=0.05, mitigation=mitigation), x, y, x[:16],
                     y[:16], 4, train_groups=g)
        assert np.isfinite([h["train_loss"] for h in result.history]).all(), mitigation
