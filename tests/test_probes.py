"""Metrics, probes (== scikit-learn), feature extraction + cache, short fine-tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.preprocessing import StandardScaler
from torch import nn

from mapex_analysis.eval import (
    accuracy,
    extract_features,
    finetune,
    knn_multilabel_probe,
    knn_probe,
    linear_multilabel_probe,
    linear_probe,
    macro_accuracy,
    mean_iou,
    mean_std,
    multilabel_map,
    retention,
    run_probe,
    segmentation_probe,
    summarize_seeds,
)
from mapex_analysis.eval.probes import patch_majority_labels

# --------------------------------------------------------------------------- metrics


def test_accuracy_and_macro_accuracy_hand_derived() -> None:
    y, p = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])
    assert accuracy(y, p) == 0.75  # 3 of 4
    # per-class recall: class 0 1/1, class 1 0/1, class 2 2/2 -> (1 + 0 + 1) / 3
    assert macro_accuracy(y, p) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="y_true has 4 samples but the prediction has 3"):
        accuracy(y, p[:3])


def test_mean_iou_hand_derived() -> None:
    # class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 0 -> 2/3; class 2 absent.
    y = np.array([[0, 0], [1, 1]])
    p = np.array([[0, 1], [1, 1]])
    assert mean_iou(y, p, num_classes=3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="valid labels are 0..2"):
        mean_iou(y, p + 2, num_classes=3)


def test_multilabel_map_equals_sklearn_macro() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((40, 5)) < 0.4).astype(int)
    s = rng.random((40, 5)) + 0.5 * y
    assert multilabel_map(y, s) == pytest.approx(average_precision_score(y, s, average="macro"))
    with pytest.raises(ValueError, match="no label has a positive sample"):
        multilabel_map(np.zeros((3, 2)), np.ones((3, 2)))


def test_retention_and_seed_summary() -> None:
    assert retention(0.6, 0.8) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="must be positive"):
        retention(0.5, 0.0)
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std: sqrt((1+0+1)/2) = 1
    assert mean_std([0.7]) == (0.7, 0.0)
    s = summarize_seeds(lambda seed: 0.5 + 0.1 * seed, [0, 1, 2])
    assert s.values == pytest.approx((0.5, 0.6, 0.7))
    assert (s.mean, s.std) == (pytest.approx(0.6), pytest.approx(0.1))


# --------------------------------------------------------------------------- probes


def _blobs(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.standard_normal((k, d)) * 2.0
    return (centres[y] + rng.standard_normal((n, d))).astype(np.float32), y


@pytest.mark.parametrize("metric,sk_metric", [("l2", "euclidean"), ("cosine", "cosine")])
def test_knn_predictions_are_sklearns(metric: str, sk_metric: str) -> None:
    Xtr, ytr = _blobs(120, 8, 4, 0)
    Xte, yte = _blobs(60, 8, 4, 1)
    res = knn_probe(Xtr, ytr, Xte, yte, k=5, metric=metric)
    ref = KNeighborsClassifier(n_neighbors=5, metric=sk_metric).fit(Xtr, ytr).predict(Xte)
    np.testing.assert_array_equal(res.predictions, ref)
    assert res.metrics["accuracy"] == pytest.approx(float((ref == yte).mean()))


def test_knn_standardized_equals_sklearn_on_scaled_features() -> None:
    Xtr, ytr = _blobs(100, 6, 3, 2)
    Xte, yte = _blobs(40, 6, 3, 3)
    Xtr[:, 0] *= 100.0  # one dominating feature: standardising changes neighbours
    Xte[:, 0] *= 100.0
    sc = StandardScaler().fit(Xtr)
    ref = KNeighborsClassifier(5).fit(sc.transform(Xtr), ytr).predict(sc.transform(Xte))
    res = knn_probe(Xtr, ytr, Xte, yte, standardize=True)
    np.testing.assert_array_equal(res.predictions, ref)


def test_linear_probe_predictions_are_sklearns() -> None:
    Xtr, ytr = _blobs(150, 10, 3, 4)
    Xte, yte = _blobs(50, 10, 3, 5)
    sc = StandardScaler().fit(Xtr)
    lr = LogisticRegression(max_iter=1000, random_state=0).fit(sc.transform(Xtr), ytr)
    res = linear_probe(Xtr, ytr, Xte, yte)
    np.testing.assert_array_equal(res.predictions, lr.predict(sc.transform(Xte)))
    np.testing.assert_allclose(res.scores, lr.predict_proba(sc.transform(Xte)), rtol=1e-6)


def test_knn_multilabel_scores_are_neighbour_votes() -> None:
    rng = np.random.default_rng(6)
    Xtr, Xte = rng.standard_normal((80, 5)), rng.standard_normal((30, 5))
    Ytr = (Xtr[:, :4] > 0).astype(int)
    Ytr[:, 3] = 0  # a label never positive in training: score 0
    Yte = (Xte[:, :4] > 0).astype(int)
    res = knn_multilabel_probe(Xtr, Ytr, Xte, Yte, k=5)
    idx = NearestNeighbors(n_neighbors=5).fit(Xtr).kneighbors(Xte, return_distance=False)
    votes = Ytr[idx].mean(axis=1)  # share of the 5 neighbours carrying each label
    np.testing.assert_allclose(res.scores, votes)
    assert res.metrics["map"] == pytest.approx(average_precision_score(Yte, votes, average="macro"))


def test_linear_multilabel_probe_is_one_vs_rest_logreg() -> None:
    rng = np.random.default_rng(7)
    Xtr, Xte = rng.standard_normal((100, 6)), rng.standard_normal((40, 6))
    Ytr, Yte = (Xtr[:, :3] > 0).astype(int), (Xte[:, :3] > 0).astype(int)
    sc = StandardScaler().fit(Xtr)
    ref = OneVsRestClassifier(LogisticRegression(max_iter=1000, random_state=0))
    ref_scores = ref.fit(sc.transform(Xtr), Ytr).predict_proba(sc.transform(Xte))
    res = linear_multilabel_probe(Xtr, Ytr, Xte, Yte)
    np.testing.assert_allclose(res.scores, ref_scores, rtol=1e-6)
    assert res.metrics["map"] == pytest.approx(
        average_precision_score(Yte, ref_scores, average="macro")
    )


def test_patch_majority_labels_hand_made() -> None:
    # 4x4 map, 2x2 grid of 2x2 patches; top-left patch {0,0,0,1} -> 0, top-right {1,1,2,2}
    # tie -> 1 (smaller id), bottom-left all 2, bottom-right {3,3,3,0} -> 3.
    m = np.array([[0, 0, 1, 1], [0, 1, 2, 2], [2, 2, 3, 3], [2, 2, 3, 0]])[None]
    np.testing.assert_array_equal(patch_majority_labels(m, 2, 4), [[0, 1, 2, 3]])


def test_segmentation_probe_recovers_patch_labels() -> None:
    # Tokens are noisy one-hots of the patch class; masks are constant per 4x4 patch,
    # so the painted-back prediction is exact: mIoU = 1.
    rng = np.random.default_rng(8)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        lab = rng.integers(0, 3, (n, 2, 2))
        tokens = np.eye(3)[lab.reshape(n, 4)] * 3.0 + 0.1 * rng.standard_normal((n, 4, 3))
        return tokens, np.repeat(np.repeat(lab, 4, axis=1), 4, axis=2)

    (Xtr, Mtr), (Xte, Mte) = make(30), make(10)
    res = segmentation_probe(Xtr, Mtr, Xte, Mte, num_classes=3)
    assert res.predictions.shape == (10, 8, 8)
    assert res.metrics["miou"] == 1.0
    with pytest.raises(ValueError, match="do not tile a 8x8 label map"):
        segmentation_probe(Xtr[:, :3], Mtr, Xte[:, :3], Mte, num_classes=3)


def test_run_probe_dispatch_and_errors() -> None:
    Xtr, ytr = _blobs(60, 4, 2, 9)
    Xte, yte = _blobs(20, 4, 2, 10)
    a = run_probe("knn", "binary", Xtr, ytr, Xte, yte, k=3)
    np.testing.assert_array_equal(a.predictions, knn_probe(Xtr, ytr, Xte, yte, k=3).predictions)
    with pytest.raises(ValueError, match="unknown probe protocol 'svm'; valid: knn, linear"):
        run_probe("svm", "binary", Xtr, ytr, Xte, yte)
    with pytest.raises(ValueError, match="unknown task kind 'regression'"):
        run_probe("knn", "regression", Xtr, ytr, Xte, yte)
    with pytest.raises(ValueError, match="unknown k-NN metric 'l1'"):
        knn_probe(Xtr, ytr, Xte, yte, metric="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"k must be in \[1, 60\]"):
        knn_probe(Xtr, ytr, Xte, yte, k=61)


# --------------------------------------------------------------------------- features


class TinyTokenModel(nn.Module):
    """A test double of the token-model contract: one linear patch embedding per modality
    (patch 4), a CLS token, a global token-mean mixing step + LayerNorm as the "encoder"."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.modalities = ("rgb", "sar")
        self.num_features = self.embed_dim = dim
        self.pool = "cls"
        self.patch_size = 4
        torch.manual_seed(0)
        self.embed = nn.ModuleDict({"rgb": nn.Conv2d(3, dim, 4, 4), "sar": nn.Conv2d(2, dim, 4, 4)})
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.calls = 0

    def tokenize(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        toks, idx = [], []
        for i, m in enumerate(self.modalities):
            if m in x:
                t = self.embed[m](x[m]).flatten(2).transpose(1, 2)  # (B, P, D)
                toks.append(t)
                idx.append(torch.full(t.shape[:2], i, dtype=torch.long))
        return torch.cat(toks, 1), torch.cat(idx, 1)

    def encode(self, tokens: torch.Tensor, modality_index: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1)  # (B, 1+N, D)
        t = t + t.mean(dim=1, keepdim=True)  # every token (CLS too) sees all tokens
        return self.norm(t + torch.tanh(self.mix(t)))

    def forward_features(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(*self.tokenize(x))

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return tokens[:, 0]

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    rgb = rng.uniform(0.0, 0.3, (n, 3, 8, 8)) + 0.3 * y[:, None, None, None]
    sar = rng.uniform(-20.0, -5.0, (n, 2, 8, 8))
    return {"rgb": rgb.astype(np.float32), "sar": sar.astype(np.float32), "label": y}


def test_extract_features_pools_and_shapes() -> None:
    model, data = TinyTokenModel(), _arrays(10, 0)
    feats = extract_features(model, {"train": data}, modalities=["rgb", "sar"], batch_size=4)
    assert (
        feats.pool == "cls" and feats.train.X.shape == (10, 8) and feats.train.X.dtype == np.float32
    )
    x = {m: torch.from_numpy(data[m]) for m in ("rgb", "sar")}
    with torch.no_grad():
        tokens = model.forward_features(x)  # (10, 1 + 4 + 4, 8)
    np.testing.assert_allclose(feats.train.X, tokens[:, 0].numpy(), atol=1e-6)
    mean = extract_features(model, data, modalities=["rgb", "sar"], pool="mean")
    np.testing.assert_allclose(mean["data"].X, tokens[:, 1:].mean(1).numpy(), atol=1e-6)
    patch = extract_features(model, data, modalities=["rgb", "sar"], pool="patch")
    # rgb tokens 1..4 and sar tokens 5..8 averaged position-wise: (10, 4, 8)
    ref = (tokens[:, 1:5] + tokens[:, 5:9]) / 2
    np.testing.assert_allclose(patch["data"].X, ref.numpy(), atol=1e-6)
    np.testing.assert_array_equal(feats.train.y, data["label"])
    assert model.training  # the caller's mode is restored


def test_extract_features_feeds_only_the_chosen_modalities() -> None:
    model, data = TinyTokenModel(), _arrays(6, 1)
    a = extract_features(model, data, modalities=["rgb"])
    b = extract_features(model, {"rgb": data["rgb"], "label": data["label"]}, modalities=["rgb"])
    np.testing.assert_array_equal(a["data"].X, b["data"].X)
    c = extract_features(model, data, modalities=["rgb", "sar"])
    assert not np.allclose(a["data"].X, c["data"].X)
    with pytest.raises(ValueError, match="unknown modality 'ele'; valid modalities: rgb, sar"):
        extract_features(model, data, modalities=["ele"])
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        extract_features(model, data, modalities=["rgb"], pool="max")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="modality 'sar' is not in the data; available: rgb"):
        extract_features(model, {"rgb": data["rgb"]}, modalities=["sar"])
    with pytest.raises(KeyError, match="no features for split 'test'; extracted splits: data"):
        _ = a.test


def test_feature_cache_hit_is_keyed_and_atomic(tmp_path: Path) -> None:
    model, data = TinyTokenModel(), _arrays(8, 2)
    kw = dict(modalities=["rgb"], cache_dir=tmp_path, cache_key="tiny|full")
    first = extract_features(model, {"train": data}, **kw)
    calls = model.calls
    second = extract_features(model, {"train": data}, **kw)
    assert model.calls == calls  # served from cache: no forward pass
    np.testing.assert_array_equal(first.train.X, second.train.X)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*.tmp"))
    # another pool, modality set, model key or data -> another cache entry
    extract_features(model, {"train": data}, **{**kw, "modalities": ["rgb", "sar"]})
    extract_features(model, {"train": data}, **{**kw, "cache_key": "tiny|slim=0.5"})
    extract_features(model, {"train": _arrays(8, 3)}, **kw)
    assert len(list(tmp_path.glob("*.npz"))) == 4
    assert model.calls == calls + 3  # 3 misses, 8 samples = 1 batch (256) each
    # a corrupt cache file is recomputed, not trusted
    for f in tmp_path.glob("*.npz"):
        f.write_bytes(b"not an npz")
    again = extract_features(model, {"train": data}, **kw)
    np.testing.assert_array_equal(again.train.X, first.train.X)


def test_finetune_learns_and_leaves_input_model_untouched() -> None:
    from types import SimpleNamespace

    model = TinyTokenModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = SimpleNamespace(kind="binary", num_classes=2)
    res = finetune(
        model, _arrays(64, 4), _arrays(32, 5), modalities=["rgb"], task=task,
        epochs=8, lr=1e-2, batch_size=16,
    )  # fmt: skip
    # the label shifts rgb by +0.3 reflectance: linearly separable, val accuracy 1.0
    assert res.metric == "accuracy" and res.value >= 0.9
    assert len(res.history) == 8 and res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    with pytest.raises(ValueError, match="unknown head 'mlp'"):
        finetune(model, _arrays(8, 6), _arrays(8, 7), modalities=["rgb"], task=task, head="mlp")


def test_syntheo_splits_through_features_and_probes() -> None:
    from mapex_analysis.data import SynthEO

    tr = SynthEO("segmentation", "train", n=24, cache=False)
    te = SynthEO("segmentation", "test", n=8, cache=False)
    model = TinyTokenModel()
    feats = extract_features(
        model, {"train": tr, "test": te}, modalities=["rgb", "sar"], pool="patch"
    )
    # 32x32 scenes, patch 4 -> 8x8 = 64 patch tokens of width 8
    assert feats.train.X.shape == (24, 64, 8) and feats.test.X.shape == (8, 64, 8)
    np.testing.assert_array_equal(feats.test.y, te.arrays()["label"])
    res = run_probe("linear", "segmentation", feats.train.X, feats.train.y, feats.test.X,
                    feats.test.y, num_classes=tr.task.num_classes)  # fmt: skip
    assert res.predictions.shape == (8, 32, 32)
    assert res.metrics["miou"] == mean_iou(te.arrays()["label"], res.predictions, 9)
    one = extract_features(model, tr, modalities=["rgb"])  # a dataset is keyed by its split
    assert list(one.splits) == ["train"] and one.train.X.shape == (24, 8)


@pytest.mark.parametrize(
    "task,metric",
    [("segmentation", "miou"), ("landcover_multilabel", "map"), ("landcover", "accuracy")],
)
def test_finetune_reports_the_metric_of_its_own_predictions(task: str, metric: str) -> None:
    from mapex_analysis.data import SynthEO

    tr = SynthEO(task, "train", n=16, cache=False)
    va = SynthEO(task, "val", n=8, cache=False)
    res = finetune(TinyTokenModel(), tr, va, modalities=["rgb"], epochs=1, batch_size=8)
    x = {"rgb": torch.from_numpy(va.arrays()["rgb"])}
    y = va.arrays()["label"]
    with torch.no_grad():
        logits = res.model(x)
    if task == "segmentation":
        assert logits.shape == (8, 9, 32, 32)  # upsampled from the 8x8 patch grid
        expected = mean_iou(y, logits.argmax(1).numpy(), 9)
    elif task == "landcover_multilabel":
        assert logits.shape == (8, 9)
        expected = multilabel_map(y, torch.sigmoid(logits).numpy())
    else:
        assert logits.shape == (8, 9)
        expected = accuracy(y, logits.argmax(1).numpy())
    assert res.metric == metric and res.value == pytest.approx(expected)


def test_extract_features_on_mapex_test() -> None:
    from mapex_analysis.data import SynthEO
    from mapex_analysis.factory import create_model

    model = create_model("mapex_test")
    ds = SynthEO("landcover", "test", n=5, img_size=16, cache=False)
    feats = extract_features(model, ds, modalities=["rgb", "sar"], batch_size=2)
    x = {m: torch.from_numpy(ds.arrays()[m]) for m in ("rgb", "sar")}
    model.eval()
    with torch.no_grad():
        ref = model(x)  # CLS-pooled (model.pool == "cls"), width 32
    np.testing.assert_allclose(feats.test.X, ref.numpy(), atol=1e-5)
    patch = extract_features(model, ds, modalities=["rgb", "sar"], pool="patch")
    assert patch.test.X.shape == (5, 4, 32)  # (16/8)^2 = 4 patches, rgb and sar averaged


class PrefixTokenModel(TinyTokenModel):
    """TinyTokenModel with ``prefix`` prefix tokens (0: no CLS, like CROMA; 3: CLS + 2
    registers, like a timm ViT with ``reg_tokens=2``); pools its own way with forward_head."""

    def __init__(self, prefix: int) -> None:
        super().__init__()
        self.num_prefix_tokens = prefix
        self.pool = "cls" if prefix else "mean"
        self.prefix = nn.Parameter(torch.randn(1, prefix, 8))

    def encode(self, tokens: torch.Tensor, modality_index: torch.Tensor) -> torch.Tensor:
        t = torch.cat([self.prefix.expand(len(tokens), -1, -1), tokens], 1)  # (B, p + N, D)
        t = t + t.mean(dim=1, keepdim=True)
        return self.norm(t + torch.tanh(self.mix(t)))

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return tokens[:, 0] if self.num_prefix_tokens else tokens.mean(dim=1)


def test_pool_tokens_drops_exactly_the_prefix_tokens() -> None:
    from mapex_analysis.eval.features import pool_tokens

    t = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # token j of sample 0 = 3j..
    # sample 0, mean of tokens p..4: p = 0 -> rows 0..4 -> (6, 7, 8); p = 1 -> rows 1..4 ->
    # (7.5, 8.5, 9.5); p = 3 -> rows 3, 4 -> (10.5, 11.5, 12.5)
    assert pool_tokens(t, "mean", 0)[0].tolist() == [6.0, 7.0, 8.0]
    assert pool_tokens(t, "mean", 1)[0].tolist() == [7.5, 8.5, 9.5]
    assert pool_tokens(t, "mean", 3)[0].tolist() == [10.5, 11.5, 12.5]
    assert pool_tokens(t, "cls", 3)[1].tolist() == [15.0, 16.0, 17.0]  # token 0 of sample 1
    with pytest.raises(ValueError, match=r"CROMA has no CLS token \(num_prefix_tokens = 0\)"):
        pool_tokens(t, "cls", 0, name="CROMA")
    with pytest.raises(ValueError, match=r"expected tokens \(B, 5 prefix \+ N patch tokens"):
        pool_tokens(t, "mean", 5)


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_extract_features_uses_num_prefix_tokens(prefix: int) -> None:
    model, data = PrefixTokenModel(prefix), _arrays(6, 11)
    x = {m: torch.from_numpy(data[m]) for m in ("rgb", "sar")}
    with torch.no_grad():
        tokens = model.forward_features(x)  # (6, prefix + 4 + 4, 8)
    assert tokens.shape == (6, prefix + 8, 8)
    mean = extract_features(model, data, modalities=["rgb", "sar"], pool="mean")["data"].X
    np.testing.assert_allclose(mean, tokens[:, prefix:].mean(1).numpy(), atol=1e-6)
    if prefix != 1:  # dropping exactly one token would be another (wrong) number
        assert not np.allclose(mean, tokens[:, 1:].mean(1).numpy(), atol=1e-4)
    patch = extract_features(model, data, modalities=["rgb", "sar"], pool="patch")["data"].X
    ref = (tokens[:, prefix : prefix + 4] + tokens[:, prefix + 4 :]) / 2  # rgb, sar per patch
    np.testing.assert_allclose(patch, ref.numpy(), atol=1e-6)
    if prefix:
        cls = extract_features(model, data, modalities=["rgb"], pool="cls")["data"].X
        assert cls.shape == (6, 8)
    else:
        with pytest.raises(ValueError, match="PrefixTokenModel has no CLS token"):
            extract_features(model, data, modalities=["rgb"], pool="cls")


def test_extract_features_on_register_token_vit_and_croma() -> None:
    from mapex_analysis.factory import create_model

    torch.manual_seed(0)
    vit = create_model("timm_vit_test", reg_tokens=2).eval()  # CLS + 2 registers
    assert vit.num_prefix_tokens == 3
    rng = np.random.default_rng(12)
    data = {"rgb": rng.uniform(0.0, 0.3, (4, 3, 32, 32)).astype(np.float32)}
    with torch.no_grad():
        tokens = vit.forward_features({"rgb": torch.from_numpy(data["rgb"])})
    assert tokens.shape == (4, 3 + 16, 32)  # 32 px / patch 8 = 16 patch tokens
    mean = extract_features(vit, data, modalities=["rgb"], pool="mean")["data"].X
    np.testing.assert_allclose(mean, tokens[:, 3:].mean(1).numpy(), atol=1e-6)
    croma = create_model("croma_test", variant="sar").eval()
    assert croma.num_prefix_tokens == 0 and croma.pool == "mean"
    sar = {"sar": rng.uniform(-20.0, -5.0, (2, 2, 16, 16)).astype(np.float32)}
    with pytest.raises(ValueError, match=r"CROMAAdapter has no CLS token .* use pool='mean'"):
        extract_features(croma, sar, modalities=["sar"], pool="cls")


def test_features_and_routing_do_not_depend_on_the_batch_size() -> None:
    """The study's ``data.batch_size`` is a speed setting (64 by default: larger batches of
    six-modality scenes page-fault every activation): features and routing counts of a MoE
    model are the same at any batch size."""
    from mapex_analysis.data import SynthEO
    from mapex_analysis.factory import create_model
    from mapex_analysis.measure.specialization import collect_routing

    torch.manual_seed(0)
    model = create_model("mapex_test").eval()
    data = SynthEO("landcover", "test", n=40, img_size=16, cache=False).arrays()
    mods = ["rgb", "sar", "ele"]
    feats = [extract_features(model, data, modalities=mods, batch_size=b)["data"].X
             for b in (40, 16, 7)]  # fmt: skip
    assert feats[0].shape[0] == 40
    for other in feats[1:]:
        np.testing.assert_allclose(other, feats[0], rtol=0, atol=1e-6)
    counts = [collect_routing(model, data, modalities=mods, batch_size=b) for b in (40, 7)]
    assert len(counts[0]) == 2  # mapex_test: two MoE blocks
    for a, b in zip(*counts, strict=True):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.counts, b.counts)
        assert int(a.counts.sum()) > 0
