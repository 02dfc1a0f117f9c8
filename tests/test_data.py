"""Tests of soteacher.data: the known-truth task, the containers, augmentations and builders."""

from __future__ import annotations

import inspect
import itertools
import math
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal

from soteacher.data import (DATASETS, ArrayDataset, DataBundle, IndexedDataset, KnownTruthTask,
                            OracleTeacher, RandomCropPad, RandomFlip, RandomRoll, build_dataset,
                            list_datasets)


@pytest.fixture(scope="module")
def default_bundle() -> DataBundle:
    return build_dataset("known_truth")


@pytest.fixture(scope="module")
def default_sample(default_bundle):
    """20000 fresh draws from the default task, with their p*."""
    x, y = default_bundle.truth.sample(20000, torch.Generator().manual_seed(7))
    return x, y, default_bundle.truth.log_prob(x.double())


def tiny_task(shape, seed=1) -> KnownTruthTask:
    return KnownTruthTask.random(3, shape, latent_dim=2, separation=1.5, latent_std=0.7,
                                 noise_std=0.5, generator=torch.Generator().manual_seed(seed))


def brute_force_log_prob(task: KnownTruthTask, x: torch.Tensor) -> torch.Tensor:
    """log p*(y|x) by an explicit mixture over shifts of full-covariance Gaussians, float64."""
    x = x.double().flatten(1)
    shape = task.input_shape
    dims = tuple(range(1, len(shape)))
    eye = torch.eye(math.prod(shape), dtype=torch.float64)
    shifts = list(itertools.product(*[range(n) for n in shape[1:]]))
    log_lik = torch.zeros(len(x), task.num_classes, dtype=torch.float64)
    for y in range(task.num_classes):
        terms = []
        for s in shifts:
            a_s = torch.stack([torch.roll(b, s, dims=dims).flatten() for b in task.basis], dim=1)
            cov = task.latent_std ** 2 * a_s @ a_s.T + task.noise_std ** 2 * eye
            terms.append(MultivariateNormal(a_s @ task.means[y], covariance_matrix=cov).log_prob(x))
        log_lik[:, y] = torch.logsumexp(torch.stack(terms), dim=0) - math.log(len(shifts))
    return torch.log_softmax(log_lik, dim=1)


def chi2_sf(stat: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def calibration_chi2(labels: torch.Tensor, log_p: torch.Tensor, conf_bins: int = 3):
    """Chi-square goodness of fit of ``labels`` to the per-point distributions ``exp(log_p)``.

    Points are binned by argmax class and confidence tercile; within a bin the cells are the rank
    of the label under p (1st, 2nd, 3rd, rest; rare tail cells merged), so that no expected count
    is tiny. Returns
    (p-value, smallest expected count).
    """
    p = log_p.exp()
    order = p.argsort(dim=1, descending=True)
    rank = (order == labels[:, None]).int().argmax(dim=1).clamp(max=3)
    sorted_p = p.gather(1, order)
    group_p = torch.stack([sorted_p[:, 0], sorted_p[:, 1], sorted_p[:, 2],
                           sorted_p[:, 3:].sum(1)], dim=1)
    conf = sorted_p[:, 0].contiguous()
    edges = torch.quantile(conf, torch.linspace(0, 1, conf_bins + 1, dtype=conf.dtype)[1:-1])
    bin_id = order[:, 0] * conf_bins + torch.bucketize(conf, edges)
    stat, dof, min_expected = 0.0, 0, float("inf")
    for b in bin_id.unique():
        m = bin_id == b
        observed = list(torch.bincount(rank[m], minlength=4).double())
        expected = list(group_p[m].sum(0))
        # Fold rare tail cells into the previous rank (decided by expected counts only).
        while len(expected) > 2 and expected[-1] < 5:
            expected[-2] += expected.pop()
            observed[-2] += observed.pop()
        o, e = torch.stack(observed), torch.stack(expected)
        stat += float(((o - e) ** 2 / e).sum())
        dof += len(e) - 1
        min_expected = min(min_expected, float(e.min()))
    return chi2_sf(stat, dof), min_expected


# ---- known truth: exact posterior ----------------------------------------------------------------
def test_log_prob_rows_are_distributions(default_sample):
    _, _, log_p = default_sample
    assert log_p.shape == (20000, 10)
    assert torch.allclose(log_p.exp().sum(1), torch.ones(20000, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 6), (1, 3, 4), (2, 5)])
def test_fft_log_prob_equals_brute_force_mixture(shape):
    task = tiny_task(shape)
    x, _ = task.sample(40, torch.Generator().manual_seed(3))
    fast = task.log_prob(x.double())
    assert fast.dtype == torch.float64
    assert torch.allclose(fast, brute_force_log_prob(task, x), atol=1e-10, rtol=0)
    # float32 input gives float32 output with the same values
    assert task.log_prob(x).dtype == torch.float32
    assert torch.allclose(task.log_prob(x).double(), fast, atol=1e-5)


def test_log_prob_is_chunked_consistently(monkeypatch):
    from soteacher.data import known_truth as kt
    task = tiny_task((1, 8))
    x, _ = task.sample(50, torch.Generator().manual_seed(0))
    whole = task.log_prob(x.double())
    monkeypatch.setattr(kt, "_CHUNK_ELEMENTS", 8 * 3 * 7)  # chunks of 7 rows
    assert torch.allclose(task.log_prob(x.double()), whole, atol=1e-13, rtol=0)


@pytest.mark.parametrize("shape", [(1, 32), (2, 5, 6)])
def test_p_star_is_invariant_under_random_roll(shape):
    task = KnownTruthTask.random(4, shape, latent_dim=5, generator=torch.Generator().manual_seed(2))
    x, _ = task.sample(300, torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    rolled = RandomRoll()(x)
    assert not torch.equal(rolled, x)
    p, p_rolled = task.log_prob(x).exp(), task.log_prob(rolled).exp()
    assert (p_rolled - p).abs().max() < 1e-5
    # ... whereas a non-circular translation does change p*
    moved = RandomCropPad(3)(x)
    assert (task.log_prob(moved).exp() - p).abs().max() > 1e-2


def test_labels_follow_p_star_chi_square(default_sample):
    x, y, log_p = default_sample
    p_value, min_expected = calibration_chi2(y, log_p)
    assert min_expected > 5
    assert p_value > 1e-3
    # The same test rejects labels that do not follow p*: the Bayes decisions themselves ...
    assert calibration_chi2(log_p.argmax(1), log_p)[0] < 1e-6
    # ... or p* of a milder, tempered task.
    assert calibration_chi2(y, torch.log_softmax(log_p * 0.8, dim=1))[0] < 1e-6


def test_sampled_labels_are_likelier_under_p_star_than_under_shuffled_p_star(default_sample):
    _, y, log_p = default_sample
    own = log_p[torch.arange(len(y)), y].mean()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    shuffled = log_p[perm][torch.arange(len(y)), y].mean()
    assert own > shuffled + 0.5


def test_default_bayes_accuracy_and_empirical_accuracy(default_bundle, default_sample):
    x, _, _ = default_sample
    task = default_bundle.truth
    assert 0.70 <= task.bayes_accuracy(x) <= 0.82
    test = default_bundle.test
    bayes_test = task.bayes_accuracy(test.x)
    empirical = (task.log_prob(test.x).argmax(1) == test.y).double().mean().item()
    assert abs(empirical - bayes_test) < 0.03


def test_bundle_fields(default_bundle):
    b = default_bundle
    assert b.name == "known_truth" and b.num_classes == 10 and b.input_shape == (1, 32)
    assert isinstance(b.train, ArrayDataset) and isinstance(b.test, ArrayDataset)
    assert b.train.x.shape == (2000, 1, 32) and b.train.x.dtype == torch.float32
    assert b.train.y.dtype == torch.int64 and set(b.train.y.tolist()) == set(range(10))
    assert isinstance(b.augment, RandomRoll)
    assert isinstance(b.truth, KnownTruthTask)


def test_known_truth_options_and_2d_images():
    b = build_dataset("known_truth", num_classes=4, input_shape=[2, 5, 6], latent_dim=6,
                      num_train=30, num_test=20, seed=3)
    assert b.input_shape == (2, 5, 6) and b.train.x.shape == (30, 2, 5, 6)
    assert len(b.test) == 20 and b.truth.log_prob(b.test.x).shape == (20, 4)
    basis = b.truth.basis.flatten(1)
    assert torch.allclose(basis @ basis.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    with pytest.raises(TypeError):
        build_dataset("known_truth", nope=1)
    with pytest.raises(ValueError, match="latent_dim"):
        build_dataset("known_truth", input_shape=(1, 4), latent_dim=5)


def test_same_seed_same_data_other_seed_other_data():
    a = build_dataset("known_truth", num_train=50, num_test=50, seed=5)
    b = build_dataset("known_truth", num_train=50, num_test=50, seed=5)
    c = build_dataset("known_truth", num_train=50, num_test=50, seed=6)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.truth.means, b.truth.means)
    assert not torch.allclose(a.train.x, c.train.x)
    assert not torch.allclose(a.truth.means, c.truth.means)
    # train and test sets are different draws
    assert not torch.allclose(a.train.x, a.test.x)


def test_oracle_teacher_matches_task():
    task = tiny_task((1, 10))
    x, _ = task.sample(64, torch.Generator().manual_seed(0))
    teacher = OracleTeacher(task)
    logits = teacher(x)
    assert logits.dtype == torch.float32 and logits.shape == (64, 3)
    assert torch.allclose(logits.softmax(1), task.log_prob(x).exp(), atol=1e-6)
    assert list(teacher.parameters()) == []
    assert set(dict(teacher.named_buffers())) == {"basis", "means"}
    with pytest.raises(ValueError, match="shape"):
        teacher(torch.zeros(2, 1, 9))


# ---- containers ----------------------------------------------------------------------------------
def test_array_dataset_items():
    x = torch.randn(5, 1, 3, dtype=torch.float64)
    ds = ArrayDataset(x, np.array([0, 1, 2, 1, 0]))
    assert len(ds) == 5 and ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    xi, yi, i = ds[3]
    assert torch.equal(xi, x[3].float()) and yi.item() == 1 and i == 3
    with pytest.raises(ValueError, match="different lengths"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(3))


def test_indexed_dataset_wraps_pairs():
    pairs = [(np.full(3, i, dtype=np.float64), i % 2) for i in range(4)]
    ds = IndexedDataset(pairs)
    assert len(ds) == 4
    x, y, i = ds[2]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert torch.equal(x, torch.full((3,), 2.0))
    assert y.dtype == torch.int64 and y.shape == () and y.item() == 0 and i == 2
    loaded = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert torch.equal(loaded[2], torch.arange(4)) and loaded[1].dtype == torch.int64


@pytest.mark.parametrize("items", [[torch.zeros(2)], [(torch.zeros(2), 1, 0)], [{"x": 1}]])
def test_indexed_dataset_rejects_non_pairs(items):
    with pytest.raises(ValueError, match=r"must return \(input, label\) pairs"):
        IndexedDataset(items)[0]


def test_indexed_dataset_rejects_non_integer_labels():
    with pytest.raises(ValueError, match="integer class index"):
        IndexedDataset([(torch.zeros(2), 0.5)])[0]


# ---- augmentations -------------------------------------------------------------------------------
def distinct_batch(*shape) -> torch.Tensor:
    # distinct non-zero values: every shift/translation of a sample is unique
    return (torch.randperm(math.prod(shape), generator=torch.Generator().manual_seed(0)) + 1.0
            ).reshape(shape)


@pytest.mark.parametrize("shape", [(200, 2, 7), (200, 2, 3, 4)])
def test_random_roll_is_a_circular_shift_of_each_sample(shape):
    x = distinct_batch(*shape)
    torch.manual_seed(0)
    out = RandomRoll()(x)
    assert out.shape == x.shape
    dims = tuple(range(1, x.dim() - 1))
    all_shifts = list(itertools.product(*[range(n) for n in shape[2:]]))
    used = []
    for b in range(shape[0]):
        match = [s for s in all_shifts if torch.equal(out[b], torch.roll(x[b], s, dims=dims))]
        assert len(match) == 1, b
        used.append(match[0])
    assert set(used) == set(all_shifts)  # every shift occurs in a big batch


@pytest.mark.parametrize("shape", [(300, 2, 9), (300, 1, 5, 6)])
def test_random_crop_pad_is_a_zero_filled_translation(shape):
    pad = 2
    x = distinct_batch(*shape)
    torch.manual_seed(0)
    out = RandomCropPad(pad)(x)
    assert out.shape == x.shape
    spatial = shape[2:]
    padded = F.pad(x, [pad] * (2 * len(spatial)))
    offsets = list(itertools.product(range(2 * pad + 1), repeat=len(spatial)))
    used = []
    for b in range(shape[0]):
        match = []
        for o in offsets:
            crop = padded[b][(slice(None), *[slice(oi, oi + n) for oi, n in zip(o, spatial)])]
            if torch.equal(out[b], crop):
                match.append(o)
        assert len(match) == 1, b
        used.append(match[0])
    assert set(used) == set(offsets)


def test_random_crop_pad_zero_padding_is_identity():
    x = torch.randn(8, 1, 5)
    assert torch.equal(RandomCropPad(0)(x), x)


def test_random_flip():
    x = distinct_batch(64, 2, 5)
    torch.manual_seed(0)
    out = RandomFlip()(x)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ same).all())
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(RandomFlip(p=0.0)(x), x)
    assert torch.equal(RandomFlip(p=1.0)(x), x.flip(-1))


@pytest.mark.parametrize("aug", [RandomRoll(), RandomCropPad(2), RandomFlip()])
def test_augmentations_are_reproducible(aug):
    x = torch.randn(64, 2, 6, 6)
    torch.manual_seed(11)
    a = aug(x)
    torch.manual_seed(11)
    b = aug(x)
    assert torch.equal(a, b)
    c = aug(x, generator=torch.Generator().manual_seed(3))
    d = aug(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, d)
    assert not torch.equal(a, aug(x))  # fresh randomness on the next call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_matches_cpu():
    task = tiny_task((2, 7))
    x, _ = task.sample(32, torch.Generator().manual_seed(0))
    assert torch.allclose(task.log_prob(x.cuda()).cpu(), task.log_prob(x), atol=1e-6)
    teacher = OracleTeacher(task).cuda()
    assert teacher(x.cuda()).device.type == "cuda"
    for aug in (RandomRoll(), RandomCropPad(2), RandomFlip()):
        y = aug(x.cuda())
        assert y.device.type == "cuda" and y.shape == x.shape
    rolled = RandomRoll()(x.cuda())
    assert (task.log_prob(rolled).cpu() - task.log_prob(x)).abs().max() < 1e-5


# ---- builders and registry -----------------------------------------------------------------------
def test_registry():
    assert {"known_truth", "mnist1d", "digits"} <= set(list_datasets())
    assert list_datasets() == DATASETS.names()
    with pytest.raises(KeyError, match="known_truth"):
        build_dataset("nope")


@pytest.mark.parametrize("name", ["known_truth", "mnist1d", "digits"])
def test_builders_take_explicit_keyword_options_with_defaults(name):
    for p in inspect.signature(DATASETS.get(name)).parameters.values():
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), p
        assert p.default is not p.empty, p


def test_mnist1d():
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    b = build_dataset("mnist1d", num_samples=500)
    assert np.random.rand() == expected_np and random.random() == expected_py
    assert b.input_shape == (1, 40) and b.num_classes == 10
    assert b.train.x.shape == (400, 1, 40) and b.test.x.shape == (100, 1, 40)
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert set(b.train.y.tolist()) == set(range(10))
    assert isinstance(b.augment, RandomCropPad) and b.augment.padding == 4
    again = build_dataset("mnist1d", num_samples=500)
    assert torch.equal(again.train.x, b.train.x)
    other = build_dataset("mnist1d", num_samples=500, seed=1)
    assert not torch.equal(other.train.x, b.train.x)


def test_digits():
    pytest.importorskip("sklearn")
    b = build_dataset("digits")
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert len(b.train) + len(b.test) == 1797
    assert abs(len(b.test) - 0.3 * 1797) < 10
    assert b.train.x.shape[1:] == (1, 8, 8) and 0 <= b.train.x.min() and b.train.x.max() == 1
    train_counts, test_counts = torch.bincount(b.train.y), torch.bincount(b.test.y)
    frac = test_counts.double() / (train_counts + test_counts)
    assert (frac - 0.3).abs().max() < 0.01  # stratified
    assert isinstance(b.augment, RandomCropPad) and b.augment.padding == 1
    assert not torch.equal(build_dataset("digits", seed=1).test.y, b.test.y)
    assert torch.equal(build_dataset("digits").test.x, b.test.x)


@pytest.mark.parametrize("name,module",
                         [("mnist1d", "mnist1d.data"), ("digits", "sklearn.datasets")])
def test_missing_optional_package_gives_install_hint(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install 'soteacher\[data\]'"):
        build_dataset(name)
