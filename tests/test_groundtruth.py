"""Ground-truth metrics: each against a hand computation on tiny inputs, pooling over batches, and a planted
dictionary (exact, and recovered by training)."""

import math

import pytest
import torch

from saelightning.groundtruth import (
    Classification,
    GroundTruthMetrics,
    Shrinkage,
    TrueL0,
    abs_cosines,
    best_matches,
    mcc,
    uniqueness,
)
from saelightning.saes import SAEConfig, build_sae
from saelightning.synthetic import SyntheticConfig, SyntheticModel, build_model

pytestmark = pytest.mark.numerics

# three true features in 2-d: e1, e2 and (0.6, 0.8)
FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])


def test_mcc_is_the_hungarian_matching_not_the_rowwise_best():
    # both latents' best match is feature 2 (|cos| 1.0 and 0.96); the one-to-one optimum is 0->2, 1->0: (1.0 + 0.8) / 2
    decoder = torch.tensor([[0.6, 0.8], [-1.6, -1.2]])  # the second row: norm 2, sign flipped (|cos| is used)
    assert torch.allclose(abs_cosines(decoder, FEATURES), torch.tensor([[0.6, 0.8, 1.0], [0.8, 0.6, 0.96]]))
    assert best_matches(decoder, FEATURES).tolist() == [2, 2]
    assert mcc(decoder, FEATURES) == pytest.approx(0.9)
    assert uniqueness(decoder, FEATURES) == pytest.approx(0.5)
    # another pair: rows (0.8, 0.6) and (0, -1) match 2 and 1: (0.96 + 1) / 2, both unique
    other = torch.tensor([[0.8, 0.6], [0.0, -1.0]])
    assert mcc(other, FEATURES) == pytest.approx(0.98)
    assert uniqueness(other, FEATURES) == 1.0


def test_mcc_with_more_latents_than_features_averages_the_matched_pairs():
    # 3 latents, 2 features: min(3, 2) = 2 pairs; |cos| = [[1, 0], [0.6, 0.8], [0, 1]] -> 0->0 and 2->1, mean 1
    decoder = torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.0, 0.5]])
    assert mcc(decoder, FEATURES[:2]) == pytest.approx(1.0)
    assert uniqueness(decoder, FEATURES[:2]) == pytest.approx(2 / 3)
    # a zero decoder row has |cos| 0 with every feature (norms clamped at 1e-8)
    assert abs_cosines(torch.zeros(1, 2), FEATURES).tolist() == [[0.0, 0.0, 0.0]]


def _classification(latents, truth, matches):
    metric = Classification(len(matches))
    metric.matches = torch.tensor(matches)
    metric.update(latents, truth)
    return metric


def test_classification_counts_and_means_by_hand():
    latents = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    truth = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    # latent 0 ~ feature 2: fires {0, 2}, truth {0, 2, 3}: TP 2 FP 0 FN 1 TN 1
    # latent 1 ~ feature 0: fires {1, 2}, truth {2}:       TP 1 FP 1 FN 0 TN 2
    # latent 2 ~ feature 1: never fires, never true:         TP 0 FP 0 FN 0 TN 4 (precision, recall, F1 0)
    metric = _classification(latents, truth, [2, 0, 1])
    assert metric.tp.tolist() == [2, 1, 0] and metric.fp.tolist() == [0, 1, 0]
    assert metric.fn.tolist() == [1, 0, 0] and metric.tn.tolist() == [1, 2, 4]
    per = metric.per_latent()
    assert per["precision"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert per["recall"].tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert per["f1_score"].tolist() == pytest.approx([0.8, 2 / 3, 0.0])
    assert per["accuracy"].tolist() == pytest.approx([0.75, 0.75, 1.0])
    means = metric.compute()
    assert float(means["precision"]) == pytest.approx(0.5)
    assert float(means["recall"]) == pytest.approx(5 / 9)
    assert float(means["f1_score"]) == pytest.approx((0.8 + 2 / 3) / 3)
    assert float(means["accuracy"]) == pytest.approx(2.5 / 3)


def test_shrinkage_skips_zero_inputs_and_true_l0_counts_active_features():
    x = torch.tensor([[2.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    x_hat = torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    shrink = Shrinkage()
    shrink.update(x, x_hat)
    assert float(shrink.compute()) == pytest.approx((0.5 + 1.0) / 2)
    l0 = TrueL0()
    l0.update(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]))
    assert float(l0.compute()) == pytest.approx(1.0)


def test_pooled_over_batches_equals_one_pass():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(12, 6, generator=g)
    decoder = torch.randn(5, 6, generator=g)
    latents = torch.relu(torch.randn(40, 5, generator=g) - 0.5)
    truth = torch.relu(torch.randn(40, 12, generator=g) - 0.7)
    x, x_hat = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    whole, parts = GroundTruthMetrics(5), GroundTruthMetrics(5)
    for m in (whole, parts):
        m.set_dictionary(decoder, features)
    whole.update(latents, x, x_hat, truth)
    for a in range(0, 40, 16):
        parts.update(latents[a:a + 16], x[a:a + 16], x_hat[a:a + 16], truth[a:a + 16])
    one, pooled = whole.compute(), parts.compute()
    assert one.keys() == pooled.keys()
    for key in one:
        assert float(pooled[key]) == pytest.approx(float(one[key]), rel=1e-12), key
    assert float(one["dead_latents"]) == float(((latents != 0).sum(0) == 0).sum())


def _planted_model(n: int = 8, d: int = 16) -> SyntheticModel:
    """A synthetic model whose features are orthonormal (no bias, no noise, no hierarchy)."""
    cfg = SyntheticConfig(num_features=n, d_in=d, max_prob=0.3, min_prob=0.1, orthogonalize_steps=0, bias_norm=0.0,
                          magnitude_std_mean=0.2, magnitude_std_std=0.0, seed=3)
    tensors = dict(build_model(cfg).tensors)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(0)))
    tensors["features"] = q.T.contiguous()
    return SyntheticModel(cfg, tensors)


def _evaluate(sae, model, blocks: int = 4):
    gt = GroundTruthMetrics(sae.config.d_sae)
    gt.set_dictionary(sae.W_dec, model.features)
    with torch.no_grad():
        for i in range(blocks):
            x, truth = model.val_block(i, 512)
            f = sae.encode(x)
            gt.update(f, x, sae.decode(f), truth)
    return {k: float(v) for k, v in gt.compute().items()}


def test_a_planted_dictionary_scores_perfectly_in_any_order():
    model = _planted_model()
    sae = build_sae(SAEConfig(architecture="relu", d_in=16, d_sae=8))
    perm, signs = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4]), torch.tensor([1.0, -1, 1, 1, -1, 1, 1, 1])
    with torch.no_grad():  # latent j is feature perm[j]: decoder and encoder rows; a small negative b_enc cuts the
        sae.W_dec.copy_(model.features[perm])  # fp32 rounding of inactive features' pre-activations (~1e-7)
        sae.W_enc.copy_(model.features[perm].T)
        sae.b_enc.fill_(-1e-4)
        sae.b_dec.zero_()
    scores = _evaluate(sae, model)
    for key in ("mcc", "uniqueness", "classification/precision", "classification/recall", "classification/f1_score"):
        assert scores[key] == pytest.approx(1.0, abs=1e-5), key
    assert scores["shrinkage"] == pytest.approx(1.0, abs=1e-3)  # the 1e-4 bias shrinks each active value a little
    assert scores["dead_latents"] == 0 and scores["true_l0"] > 0.5
    gt = GroundTruthMetrics(8)
    gt.set_dictionary(sae.W_dec * signs[:, None], model.features)  # a sign flip leaves |cos| (mcc) unchanged
    assert gt.per_latent()["best_match"] == perm.tolist()
    assert mcc(sae.W_dec * signs[:, None], model.features) == pytest.approx(1.0, abs=1e-6)


def test_a_planted_dictionary_is_recovered_by_training(one_thread):  # 400 tiny steps: one thread
    """A BatchTopK SAE of twice the dictionary's size, trained from a random init on the planted model's samples,
    puts a latent on every true direction: each of the 8 features is some latent's best match (uniqueness 8 / 16)
    and the matched pairs' |cos| average over 0.95 (4 seeds gave 0.964-0.981)."""
    model = _planted_model()
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=16, d_sae=16, k=2))
    before = _evaluate(sae, model)["mcc"]
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(400):
        x, _ = model.block(1, 0, step, 256)
        if step == 0:
            sae.init_from_batch(x)
        loss = sae(x)[2]["loss"]
        optimizer.zero_grad()
        loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    after = _evaluate(sae.eval(), model)
    assert before < 0.7 and after["mcc"] > 0.95, (before, after)
    assert after["uniqueness"] == 0.5  # (some of the 8 spare latents may die)
    assert not math.isnan(after["shrinkage"])
