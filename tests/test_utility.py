"""What generated images teach (tldr_fast.utility): each metric against an explicit definition, and on
constructed cases (real images score like real images, copies of one image score zero diversity, noise
scores chance); and the metrics as evaluate reports them."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tldr_fast.data import load_dataset, subset
from tldr_fast.evaluate import DEFINITIONS, evaluate
from tldr_fast.models import distillation_loss, predict_logits, train_classifier
from tldr_fast.reference import pairwise_ssim as reference_ssim
from tldr_fast.utility import (
    Teaching,
    classwise_prdc,
    minmax_rescale,
    nn_feature_distance,
    prdc,
    real_curve,
    student_accuracy,
    worth,
)

SSIM = dict(backend="torch", device="cpu")
SMALL = Teaching(arch="mlp", steps=80, batch_size=32, real_sizes=(1, 5), draws=1)  # the machinery, cheaply


@pytest.fixture(scope="module")
def digits():
    """Real MNIST digits: 30 per class to learn from, 30 other ones per class to test on."""
    test = load_dataset("mnist:test")
    learn = subset(test, 30, seed=0)
    rest = test.select(torch.nonzero(~torch.isin(test.indices, learn.indices)).view(-1))
    return learn, subset(rest, 30, seed=1)


@pytest.fixture(scope="module")
def judge(digits):
    return train_classifier(digits[0], "lenet", epochs=6, batch_size=32, device="cpu")


def _prdc_by_definition(real, fake, k):
    """Naeem et al. 2020, written as loops over the points."""
    n, m = len(real), len(fake)

    def kth(x, i):
        d = sorted(float(torch.dist(x[i], x[j])) for j in range(len(x)) if j != i)
        return d[k - 1]

    r = [kth(real, i) for i in range(n)]
    s = [kth(fake, j) for j in range(m)]
    dist = [[float(torch.dist(real[i], fake[j])) for j in range(m)] for i in range(n)]
    precision = sum(any(dist[i][j] <= r[i] for i in range(n)) for j in range(m)) / m
    recall = sum(any(dist[i][j] <= s[j] for j in range(m)) for i in range(n)) / n
    density = sum(dist[i][j] <= r[i] for i in range(n) for j in range(m)) / (k * m)
    coverage = sum(min(dist[i]) <= r[i] for i in range(n)) / n
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("n,m,d,k", [(9, 7, 3, 3), (13, 13, 5, 3), (6, 11, 2, 1), (8, 5, 4, 2)])
def test_prdc_matches_its_definition(gen, n, m, d, k):
    real = torch.randn(n, d, generator=gen, dtype=torch.float64)
    fake = torch.randn(m, d, generator=gen, dtype=torch.float64) * 1.3 + 0.4
    got, want = prdc(real, fake, k), _prdc_by_definition(real, fake, k)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_prdc_on_constructed_cases(gen):
    real = torch.randn(300, 8, generator=gen)
    same = prdc(real, torch.randn(300, 8, generator=gen))  # another sample of the same distribution
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and same["coverage"] > 0.8
    assert 0.7 < same["density"] < 1.3
    copies = prdc(real, real.mean(0, keepdim=True).repeat(300, 1))  # one image, 300 times: no diversity
    assert copies["recall"] == 0 and copies["coverage"] < 0.05
    far = prdc(real, torch.randn(300, 8, generator=gen) + 20)  # nothing like the real data
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="more than k=3"):
        prdc(real[:3], real)


def test_classwise_prdc_is_the_mean_over_classes_at_equal_sizes(gen):
    real, real_y = torch.randn(60, 4, generator=gen), torch.arange(3).repeat(20)
    fake, fake_y = torch.randn(24, 4, generator=gen), torch.tensor([0] * 12 + [2] * 12)
    got = classwise_prdc(real, real_y, fake, fake_y, k=3, seed=5)
    g = torch.Generator().manual_seed(5)
    parts = []
    for c in (0, 2):  # the classes with fakes, in order, each with a random 12 of its 20 real points
        rows = torch.nonzero(real_y == c).view(-1)
        parts.append(prdc(real[rows[torch.randperm(20, generator=g)[:12]]], fake[fake_y == c], 3))
    for key in got:
        assert got[key] == pytest.approx((parts[0][key] + parts[1][key]) / 2, abs=1e-12)
    assert classwise_prdc(real, real_y, fake[:2], fake_y[:2]) == dict.fromkeys(got)  # too few points


def test_nn_feature_distance_is_the_nearest_of_the_class(gen):
    q, qy = torch.randn(7, 3, generator=gen), torch.tensor([0, 1, 1, 2, 0, 1, 3])
    r, ry = torch.randn(12, 3, generator=gen), torch.tensor([0, 1, 2] * 4)
    got = nn_feature_distance(q, qy, r, ry)
    for i in range(7):
        same = [float(torch.dist(q[i].double(), r[j].double())) for j in range(12) if ry[j] == qy[i]]
        assert (math.isnan(got[i]) and not same) or got[i] == pytest.approx(min(same), abs=1e-12)


@pytest.mark.parametrize(
    "acc,want",
    [
        (0.05, 0.0),  # below chance
        (0.1, 0.0),  # chance
        (0.25, 0.5),  # halfway from chance to the first size, linearly
        (0.4, 1.0),  # on the curve
        (0.55, math.sqrt(10)),  # halfway between 1 and 10 in log k
        (0.7, 10.0),
        (0.8, 100.0),  # never reached: the largest size
    ],
)
def test_worth_reads_the_real_curve(acc, want):
    assert worth(acc, {"10": 0.7, "1": 0.4, "100": 0.75}, chance=0.1) == pytest.approx(want)


def test_worth_takes_the_first_crossing_of_a_noisy_curve():
    curve = {"1": 0.5, "3": 0.45, "10": 0.8}
    assert worth(0.48, curve, 0.1) == pytest.approx(0.95)  # before the dip
    t = (0.6 - 0.45) / (0.8 - 0.45)
    assert worth(0.6, curve, 0.1) == pytest.approx(math.exp(math.log(3) + t * (math.log(10) - math.log(3))))


def test_minmax_rescale(gen):
    x = torch.rand(4, 2, 9, 9, generator=gen) * 0.3 + 0.1
    x[2] = 0.25  # blank
    out, blank = minmax_rescale(x)
    assert blank.tolist() == [False, False, True, False]
    assert torch.equal(out[2], x[2])
    for i in (0, 1, 3):
        assert float(out[i].min()) == pytest.approx(0) and float(out[i].max()) == pytest.approx(1)
        want = (x[i] - x[i].min()) / (x[i].max() - x[i].min())
        torch.testing.assert_close(out[i], want)


@pytest.mark.parametrize("t", [1.0, 4.0, 0.5])
def test_distillation_loss_value_and_gradient(gen, t):
    s = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    loss = distillation_loss(s, teacher, t)
    p, q = F.softmax(teacher / t, 1), F.softmax(s / t, 1)
    want = t * t * (p * (p.log() - q.log())).sum(1).mean()  # T^2 KL(p || q), batch mean
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad, t * (q - p).detach() / 5)  # d/ds: T (softmax(s/T) - softmax(t/T)) / B


def test_students_learn_from_real_images_not_from_noise(gen, digits):
    learn, test = digits
    real = student_accuracy(learn.images, learn.labels, test, class_names=learn.class_names, recipe=SMALL)
    noise = torch.rand(learn.images.shape, generator=gen)
    chance = student_accuracy(noise, learn.labels, test, class_names=learn.class_names, recipe=SMALL)
    assert real > 0.7 and chance < 0.25, (real, chance)


def test_distillation_follows_the_teacher(digits, judge):
    learn, test = digits
    taught = student_accuracy(
        learn.images,
        learn.labels,
        test,
        class_names=learn.class_names,
        recipe=SMALL,
        teacher=lambda x: predict_logits(judge, x),
    )
    blind = student_accuracy(  # a teacher that says the same for every image teaches nothing
        learn.images,
        learn.labels,
        test,
        class_names=learn.class_names,
        recipe=SMALL,
        teacher=lambda x: torch.zeros(len(x), 10),
    )
    assert taught > 0.7 and blind < 0.25, (taught, blind)


def test_real_curve_is_cached_by_content_and_recipe(digits, tmp_path, monkeypatch):
    learn, test = digits
    curve = real_curve(learn, test, SMALL, cache=tmp_path)
    assert set(curve) == {"1", "5"} and 0.1 < curve["1"] < curve["5"]
    (path,) = tmp_path.glob("real-curve-*.json")
    assert json.loads(path.read_text())["curve"] == curve
    import tldr_fast.utility as utility

    def no_training(*args, **kwargs):
        raise AssertionError("the cached curve was trained again")

    monkeypatch.setattr(utility, "student_accuracy", no_training)
    assert real_curve(learn, test, SMALL, cache=tmp_path) == curve
    with pytest.raises(AssertionError, match="trained again"):  # another recipe is another curve
        real_curve(learn, test, Teaching(steps=7, real_sizes=(1,), draws=1), cache=tmp_path)
    with pytest.raises(AssertionError, match="trained again"):  # other test images too
        real_curve(learn, subset(test, 20, seed=3), SMALL, cache=tmp_path)
    # sizes beyond the pool's smallest class are left out
    monkeypatch.setattr(utility, "student_accuracy", lambda *a, **k: 0.5)
    assert set(real_curve(subset(learn, 3, seed=0), test, SMALL)) == {"1"}


def test_evaluate_reports_what_the_images_teach(gen, digits, judge, tmp_path):
    learn, test = digits
    images, labels = test.images[:100], test.labels[:100]
    report = evaluate(
        images,
        learn,
        labels,
        value_range=(0.0, 1.0),
        classifier=judge,
        eval_classifier=judge,
        test=test,
        teaching=SMALL,
        cache=tmp_path,
        **SSIM,
    )
    o = report.to_dict()["overall"]
    assert o["teach_images"] == 100 and set(o["real_curve"]) == {"1", "5"}
    assert o["cas"] > 0.6 and o["distill_accuracy"] > 0.6
    assert o["worth_real_per_class"] == pytest.approx(worth(o["cas"], o["real_curve"], 0.1))
    assert all(0 <= o[k] <= 1 for k in ("precision", "recall", "coverage")) and o["density"] >= 0
    assert 0.5 < o["feature_nn_ratio"] < 2  # real unseen digits against real unseen digits (the test set)
    assert set(DEFINITIONS) >= {"cas", "real_curve", "worth_real_per_class", "distill_accuracy", "nn_ssim_ci"}
    assert "what they teach" in report.summary() and "precision" in report.summary()
    # without test images and an evaluation classifier, none of it is computed
    plain = evaluate(images, learn, labels, value_range=(0.0, 1.0), **SSIM).to_dict()["overall"]
    assert "cas" not in plain and "precision" not in plain and plain["nn_ssim_ci_mean"] is not None


def test_contrast_invariant_nn_ssim(gen, digits):
    learn, _ = digits
    pos = torch.nonzero(learn.labels == 4).view(-1)
    faint = learn.images[pos[:3]] * 0.2  # three training images, very faint
    blank = torch.zeros(1, 1, 28, 28)
    noise = torch.rand(1, 1, 28, 28, generator=gen)
    x = torch.cat([faint, blank, noise])
    labels = torch.full((5,), 4)
    report = evaluate(x, learn, labels, value_range=(0.0, 1.0), **SSIM)
    ci = report.nn_ssim_ci
    # the definition: nn_ssim of the min-max rescaled image against the class's training images
    rescaled, _ = minmax_rescale(x)
    want = reference_ssim(rescaled, learn.images[pos]).max(1).values
    torch.testing.assert_close(ci[[0, 1, 2, 4]], want[[0, 1, 2, 4]], atol=1e-4, rtol=0)
    assert float(ci[3]) == 0.0  # blank scores 0 (raw NN-SSIM of black is far above 0)
    assert float(report.nn_ssim[3]) > 0.2
    assert (ci[:3] > 0.99).all() and (report.nn_ssim[:3] < ci[:3]).all()  # faint copies are copies
    assert float(ci[4]) < 0.2


def test_bad_input(digits, judge):
    learn, test = digits
    x = learn.images[:10]
    with pytest.raises(ValueError, match="teach_per_class"):
        evaluate(x, learn, learn.labels[:10], value_range=(0.0, 1.0), test=test, teach_per_class=0, **SSIM)
    with pytest.raises(ValueError, match="test images are"):
        evaluate(x, learn, learn.labels[:10], value_range=(0.0, 1.0), test=(torch.rand(4, 1, 9, 9), torch.arange(4)))
    nan = x.clone()
    nan[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(nan, learn, learn.labels[:10], value_range=(0.0, 1.0), **SSIM)
    headless = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(ValueError, match="no .features"):
        evaluate(x, learn, learn.labels[:10], value_range=(0.0, 1.0), eval_classifier=headless, **SSIM)
    with pytest.raises(ValueError, match="temperature"):
        train_classifier(learn, "lenet", epochs=1, temperature=0.0, teacher=lambda x: x)
    with pytest.raises(ValueError, match="at least 2"):
        student_accuracy(x[:1], learn.labels[:1], test, class_names=learn.class_names)
