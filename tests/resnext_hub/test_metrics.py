"""Multi-label metrics: average precision against hand-computed cases, F1-maximising thresholds."""

from __future__ import annotations

import pytest
import torch

from resnext_hub.metrics import (
    DEFAULT_THRESHOLD,
    average_precisions,
    f1_scores,
    f1_thresholds,
    mean_average_precision,
)

# Four images, two labels.
SCORES = torch.tensor([[0.9, 0.1], [0.8, 0.6], [0.3, 0.7], [0.2, 0.2]])
TARGETS = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])


def test_average_precision_by_hand():
    # Label 0, ranked: 0.9 (+), 0.8 (-), 0.3 (+), 0.2 (-): recall 1/2 at precision 1, then 2/2 at precision 2/3.
    # Label 1, ranked: 0.7 (+), 0.6 (+), 0.2 (-), 0.1 (-): both positives first, AP 1.
    assert average_precisions(SCORES, TARGETS) == pytest.approx([0.5 * 1 + 0.5 * 2 / 3, 1.0])
    assert mean_average_precision(SCORES, TARGETS) == pytest.approx((5 / 6 + 1) / 2)


def test_ties_count_together_and_a_label_without_positives_is_left_out():
    scores = torch.tensor([[0.5, 0.3], [0.5, 0.2], [0.1, 0.9]])
    targets = torch.tensor([[0, 0], [1, 0], [0, 0]])
    # Label 0: the two images at 0.5 are cut together: recall 1 at precision 1/2, whatever their order.
    assert average_precisions(scores, targets) == [pytest.approx(0.5), None]
    assert mean_average_precision(scores, targets) == pytest.approx(0.5)
    assert mean_average_precision(scores, torch.zeros_like(targets)) is None


def test_average_precision_is_the_mean_precision_at_each_positive_without_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 3, generator=generator)  # continuous: no ties
    targets = (torch.rand(40, 3, generator=generator) < 0.4).long()
    for label, got in enumerate(average_precisions(scores, targets)):
        order = scores[:, label].argsort(descending=True)
        hits = targets[order, label]
        ranks = hits.nonzero().flatten() + 1
        expected = sum(float(hits[:rank].sum()) / int(rank) for rank in ranks) / len(ranks)
        assert got == pytest.approx(expected)


def test_thresholds_maximise_each_labels_f1():
    thresholds = f1_thresholds(SCORES, TARGETS)
    # Label 0: keeping the top 3 (0.9, 0.8, 0.3) gives F1 0.8, the best: halfway between 0.3 and 0.2.
    # Label 1: keeping the top 2 gives F1 1: halfway between 0.6 and 0.2.
    assert thresholds == pytest.approx([0.25, 0.4])
    chosen = SCORES >= torch.tensor(thresholds)
    assert chosen[:, 1].tolist() == [False, True, True, False]


def test_a_label_without_positive_images_gets_the_default_threshold():
    assert f1_thresholds(SCORES, torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]]))[1] == DEFAULT_THRESHOLD


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="one shape"):
        average_precisions(SCORES, TARGETS[:2])


def test_f1_per_label():
    chosen = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    targets = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    # Label 0: 1 hit, 2 chosen, 1 present: 2/3. Label 1: 1 hit, 1 chosen, 2 present: 2/3. Label 2: none: 0.
    assert f1_scores(chosen, targets).tolist() == pytest.approx([2 / 3, 2 / 3, 0.0])
