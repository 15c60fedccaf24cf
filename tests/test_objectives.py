import math

import pytest
import torch
import torch.nn.functional as F

from glimpse.losses import clip_loss, siglip_loss
from glimpse.metrics.retrieval import retrieval_metrics, zeroshot_accuracy


def test_clip_loss_matches_reference_formula():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(clip_loss(img, txt, scale), ref)
    # perfectly aligned pairs with a high temperature give a near-zero loss
    assert clip_loss(img, img, torch.tensor(100.0)) < clip_loss(img, txt, torch.tensor(100.0))


def test_siglip_loss_matches_reference_formula():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    ref = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            ref -= math.log(1 / (1 + math.exp(-z * (s * img[i] @ txt[j] + b).item())))
    torch.testing.assert_close(siglip_loss(img, txt, s, b), torch.tensor(ref / 5, dtype=torch.float32))


def test_hard_negatives_are_more_candidates_for_images_only():
    torch.manual_seed(0)
    img, txt, neg = (F.normalize(torch.randn(n, 8), dim=-1) for n in (4, 4, 3))
    s, b = torch.tensor(10.0), torch.tensor(-5.0)
    i2t = s * img @ torch.cat([txt, neg]).T  # [4, 7]: every image against the texts, then the negatives
    ref = (F.cross_entropy(i2t, torch.arange(4)) + F.cross_entropy(s * txt @ img.T, torch.arange(4))) / 2
    torch.testing.assert_close(clip_loss(img, txt, s, neg), ref)
    assert clip_loss(img, txt, s, neg) > clip_loss(img, txt, s)  # more candidates: a harder choice
    # an empty set of negatives (a process whose batch had none) is no negatives at all
    torch.testing.assert_close(clip_loss(img, txt, s, neg[:0]), clip_loss(img, txt, s))
    ref = 0.0
    for i in range(4):
        for j, t in enumerate(torch.cat([txt, neg])):
            z = 1.0 if i == j else -1.0
            ref -= math.log(1 / (1 + math.exp(-z * (s * img[i] @ t + b).item())))
    torch.testing.assert_close(siglip_loss(img, txt, s, b, neg), torch.tensor(ref / 4, dtype=torch.float32))


def test_retrieval_metrics_by_hand():
    images = torch.eye(3)
    # captions 0 and 1 belong to image 0, caption 2 to image 1, caption 3 to image 2
    texts = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0.2, 0.9], [0, 0, 1.0]])
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, owner, ks=(1, 2))
    # text->image: caption 2 points at image 2 (rank 2), the others at their own image
    assert m["t2i_r1"] == 0.75 and m["t2i_r2"] == 1.0
    # image->text: image 1 scores caption 2 at 0.2 but caption 1 (not its own) at 0.1: a hit;
    # image 2 scores its caption 3 (1.0) above caption 2 (0.9): a hit; image 0 has two own captions
    assert m["i2t_r1"] == 1.0
    # now make caption 1 look more like image 1 than caption 2 does: image 1 misses at rank 1
    texts[1] = torch.tensor([0.5, 0.5, 0])
    m = retrieval_metrics(images, texts, owner, ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(2 / 3) and m["i2t_r2"] == 1.0


def test_ties_count_against_the_model():
    m = retrieval_metrics(torch.ones(4, 2), torch.ones(4, 2), torch.arange(4), ks=(1,))
    assert m["t2i_r1"] == 0.0 and m["i2t_r1"] == 0.0


def test_zeroshot_accuracy():
    assert zeroshot_accuracy(torch.eye(3), torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
