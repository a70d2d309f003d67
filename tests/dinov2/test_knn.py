"""kNN protocol: weighted voting with softmax(sim / T) over the top-k neighbours."""

import torch
import torch.nn.functional as F

from dinov2.eval.knn import knn_classify


def test_separable_features_give_100_percent():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    labels = torch.arange(5).repeat_interleave(30)
    feats = F.normalize(centers[labels] + 0.05 * torch.randn(150, 16, generator=g), dim=1)
    top1 = knn_classify(feats[::2], labels[::2], feats[1::2], labels[1::2], ks=(10, 20))
    assert top1 == {10: 100.0, 20: 100.0}


def test_weighted_vote_prefers_closer_neighbours():
    # Two far neighbours of class 1 outvote nothing against one very close neighbour of class 0 at T = 0.07.
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    test = F.normalize(torch.tensor([[1.0, 0.05]]), dim=1)
    assert knn_classify(train, labels, test, torch.tensor([0]), ks=(3,), temperature=0.07) == {3: 100.0}
    # With a huge temperature the vote is a plain majority and class 1 wins.
    assert knn_classify(train, labels, test, torch.tensor([0]), ks=(3,), temperature=100.0) == {3: 0.0}
