"""Slide baselines (hipt_jax.models.mil) against torch references written from the published
definitions, padding invariance, and the metrics and pictures against scikit-learn /
scikit-survival / SciPy."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from hipt_jax.evaluation import metrics
from hipt_jax.finetune import plots
from hipt_jax.models import checkpoint, mil

IN, EMBED, HIDDEN, K = 24, 16, 8, 3


def _dense(layer):
    return {"kernel": jnp.asarray(layer.weight.detach().numpy().T), "bias": jnp.asarray(layer.bias.detach().numpy())}


def _model(name, k_sample=4):
    return mil.build_mil(mil.mil_arch(name, K, IN, embed=EMBED, attn_hidden=HIDDEN, dropout_rate=0.25,
                                      k_sample=k_sample))


def test_abmil_matches_gated_attention_reference():
    """Plant: attention_a with sigmoid and attention_b with tanh swapped -> 1e-1 error."""
    torch = pytest.importorskip("torch")
    from tests.reference_torch_mil import GatedABMIL

    torch.manual_seed(0)
    ref = GatedABMIL(IN, EMBED, HIDDEN, K)
    params = {"fc": _dense(ref.fc), "classifier": _dense(ref.classifier),
              "attention": {"attention_a": _dense(ref.attention_V), "attention_b": _dense(ref.attention_U),
                            "attention_c": _dense(ref.attention_weights)}}
    x = np.random.default_rng(0).normal(size=(11, IN)).astype(np.float32)
    want_logits, want_attn = (t.detach().numpy() for t in ref(torch.from_numpy(x)))
    logits, aux = _model("abmil").apply({"params": params}, jnp.asarray(x))
    assert np.abs(np.asarray(logits) - want_logits).max() <= 1e-5
    assert np.abs(np.asarray(aux["attention"]) - want_attn).max() <= 1e-5


def test_clam_sb_matches_reference_including_instance_loss():
    """Plants: top-k over -attention for the positives; no /n_classes -> instance loss differs."""
    torch = pytest.importorskip("torch")
    from tests.reference_torch_mil import CLAMSBRef

    torch.manual_seed(1)
    ref = CLAMSBRef(IN, EMBED, HIDDEN, K, k_sample=4)
    params = {"fc": _dense(ref.fc), "classifier": _dense(ref.classifiers),
              "attention": {"attention_a": _dense(ref.attention_a), "attention_b": _dense(ref.attention_b),
                            "attention_c": _dense(ref.attention_c)},
              **{f"instance_{c}": _dense(ref.instance_classifiers[c]) for c in range(K)}}
    x = np.random.default_rng(1).normal(size=(13, IN)).astype(np.float32)
    model = _model("clam_sb")
    for label in range(K):
        want = [t.detach().numpy() for t in ref(torch.from_numpy(x), label)]
        logits, aux = model.apply({"params": params}, jnp.asarray(x), None, False, jnp.int32(label))
        assert np.abs(np.asarray(logits) - want[0]).max() <= 1e-5
        assert np.abs(np.asarray(aux["attention"]) - want[1]).max() <= 1e-5
        assert abs(float(aux["instance_loss"]) - float(want[2])) <= 1e-5


@pytest.mark.parametrize("name", mil.MIL_MODELS)
def test_padding_leaves_outputs_unchanged(name):
    """Plant: no -inf on padded scores (or an unmasked mean) -> outputs move by >1e-2."""
    model = _model(name, k_sample=4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, IN)))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, IN)).astype(np.float32)   # fewer instances than k_sample
    padded = np.concatenate([x, 5 + rng.normal(size=(5, IN)).astype(np.float32)])
    mask = np.arange(8) < 3
    plain, aux0 = model.apply(variables, jnp.asarray(x), None, False, jnp.int32(1))
    pad, aux1 = model.apply(variables, jnp.asarray(padded), jnp.asarray(mask), False, jnp.int32(1))
    assert np.abs(np.asarray(plain) - np.asarray(pad)).max() <= 1e-6
    assert np.abs(np.asarray(aux0["attention"]) - np.asarray(aux1["attention"])[:3]).max() <= 1e-6
    assert np.all(np.asarray(aux1["attention"])[3:] == 0)
    if "instance_loss" in aux0:
        assert abs(float(aux0["instance_loss"]) - float(aux1["instance_loss"])) <= 1e-6


def test_baseline_checkpoint_round_trip(tmp_path):
    model = _model("clam_sb")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, IN)))["params"]
    arch = mil.mil_arch("clam_sb", K, IN, embed=EMBED, attn_hidden=HIDDEN, k_sample=4)
    checkpoint.save(str(tmp_path / "m"), params, "mil", arch)
    loaded = checkpoint.load(str(tmp_path / "m"))
    assert loaded.kind == "mil" and loaded.module() == model
    x = jnp.ones((4, IN))
    np.testing.assert_array_equal(loaded.module().apply(loaded.variables, x)[0], model.apply({"params": params}, x)[0])


def test_metrics_equal_sklearn_and_sksurv():
    """Plant: c-index counting tied times with both events as comparable -> differs from sksurv."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    sksurv_metrics = pytest.importorskip("sksurv.metrics")

    rng = np.random.default_rng(0)
    for trial in range(5):
        y = rng.integers(0, 4, 60)
        probs = rng.dirichlet(np.ones(4), 60)
        assert abs(metrics.auc(y, probs) - roc_auc_score(y, probs, multi_class="ovr", average="macro")) <= 1e-9
        assert abs(metrics.auc(y % 2, probs[:, :2] / probs[:, :2].sum(1, keepdims=True))
                   - roc_auc_score(y % 2, probs[:, 1] / probs[:, :2].sum(1))) <= 1e-9
        pred = rng.integers(0, 4, 60)
        assert abs(metrics.balanced_accuracy(y, pred) - balanced_accuracy_score(y, pred)) <= 1e-9
        times = rng.integers(1, 20, 80).astype(float)  # ties in time on purpose
        events = rng.random(80) < 0.6
        risk = np.round(rng.normal(size=80), 1)        # and ties in risk
        want = sksurv_metrics.concordance_index_censored(events, times, risk)[0]
        assert abs(metrics.concordance_index(times, events, risk) - want) <= 1e-9


def test_logrank_and_at_risk_counts_from_scipy_and_km_plot(tmp_path):
    """Plant: groups swapped with events in logrank_pvalue -> p differs from the chi2 formula."""
    from scipy import stats

    rng = np.random.default_rng(3)
    times = np.r_[rng.exponential(5, 40), rng.exponential(15, 40)]
    events = rng.random(80) < 0.7
    group = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    p = metrics.logrank_pvalue(times, events, group)
    res = stats.logrank(stats.CensoredData(uncensored=times[group & events], right=times[group & ~events]),
                        stats.CensoredData(uncensored=times[~group & events], right=times[~group & ~events]))
    assert p == res.pvalue and p < 0.05
    assert plots.at_risk_counts(np.array([1.0, 2, 3, 4]), [0, 2, 3.5]).tolist() == [4, 3, 1]
    info = plots.plot_km(times, ~events, -times + rng.normal(0, 1, 80), str(tmp_path / "km.png"))
    assert (tmp_path / "km.png").stat().st_size > 0 and 0 <= info["logrank_p"] <= 1
    assert sum(c[0] for c in info["at_risk"].values()) == 80


def test_roc_picture_has_one_curve_per_class(tmp_path):
    """Plant: the old micro-average (one stacked curve) -> 1 curve instead of 3."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    folds = []
    for _ in range(2):
        y = rng.integers(0, 3, 30)
        probs = rng.dirichlet(np.ones(3), 30)
        folds.append({"labels": y, "probs": probs, "auc": metrics.auc(y, probs)})
    curves = plots.plot_roc(folds, ["A", "B", "C"], str(tmp_path / "roc.png"))
    assert len(curves) == 3 and all(name.startswith(c) for name, c in zip(curves, "ABC"))
    y = np.concatenate([f["labels"] for f in folds])
    probs = np.concatenate([f["probs"] for f in folds])
    for k, (_, _, auc) in enumerate(curves.values()):
        assert abs(auc - roc_auc_score(y == k, probs[:, k])) <= 1e-12
    assert (tmp_path / "roc.png").stat().st_size > 0
