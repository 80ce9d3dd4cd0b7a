"""HIPT-LGP (or slide baseline: hipt_jax.models.mil) training and evaluation for one
cross-validation fold (subtyping or survival), with validation-based model selection.

One step = one slide (subtyping) or one patient (survival; the patient's slides concatenated
along the region axis). Slides have different region counts M, so every input is padded to a
bucket length with a mask (hipt_jax.models.lgp.pad_to_bucket): the jitted functions compile
once per bucket, not once per slide.

Gradient accumulation is real: per-item gradients are summed on device and the optimizer steps
on sum / accumulate_steps every ``accumulate_steps`` items (32 patients for survival, as MCAT's
``gc``; 1 for subtyping). A partial accumulation at the end of an epoch is applied with the
same 1 / accumulate_steps scaling (MCAT would carry it into the next epoch).

The optimizer is torch's Adam with coupled L2 (``weight_decay`` added to the gradient before
the moments: optax.add_decayed_weights then optax.adam). A frozen local ViT-4K gets no update at
all (no gradient and no decay), exactly like parameters with requires_grad=False in torch.

With a frozen ViT-4K (the default) its per-region output is computed once per slide before
training (``encode_local``) and the trainer runs only the aggregator: the same model and the same
gradients, a fraction of the compute.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from hipt_jax.evaluation import metrics
from hipt_jax.finetune import survival
from hipt_jax.models.lgp import DEFAULT_BUCKETS, HIPTLGP, pad_to_bucket
from hipt_jax.prefetch import prefetch_to_device


@dataclasses.dataclass
class Item:
    """One training/eval unit: a slide (subtyping) or a patient (survival)."""

    item_id: str
    inputs: np.ndarray            # [M,192] local embeddings (frozen) or [M,256,384] features
    label: int = -1               # class (subtyping) or time bin (survival)
    time: float = 0.0
    censored: bool = False


@dataclasses.dataclass
class TrainConfig:
    task: str = "subtyping"       # "subtyping" | "survival"
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-5
    accumulate_steps: int = 1
    balanced_sampling: bool = True
    alpha_surv: float = 0.0
    buckets: Sequence[int] = DEFAULT_BUCKETS
    seed: int = 0
    bag_weight: float = 0.7       # CLAM: weight of the bag loss against the instance loss
    select_metric: str = "loss"   # validation quantity that picks the epoch: loss | auc | c_index | ...
    early_stopping: bool = False
    patience: int = 20            # CLAM's defaults
    min_epochs: int = 50


def make_optimizer(params, lr: float, weight_decay: float, freeze_local: bool):
    """torch.optim.Adam(lr, weight_decay) over the trainable params; frozen ViT-4K untouched."""
    adam_l2 = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))
    labels = {k: ("frozen" if (k == "local_vit" and freeze_local) else "train") for k in params}
    return optax.multi_transform({"train": adam_l2, "frozen": optax.set_to_zero()}, labels)


@functools.lru_cache(maxsize=8)
def _local_fn(model: HIPTLGP):
    return jax.jit(lambda v, x: model.apply(v, x, method=HIPTLGP.local))


def encode_local(model: HIPTLGP, variables, features: np.ndarray, buckets=DEFAULT_BUCKETS) -> np.ndarray:
    """[M,256,384] ViT-256 features -> [M,192] ViT-4K CLS (padded to a bucket, one compile each)."""
    padded, _ = pad_to_bucket(features, buckets)
    return np.asarray(_local_fn(model)(variables, padded))[: len(features)]


def _is_lgp(model) -> bool:
    return isinstance(model, HIPTLGP)


def _forward(model, params, x, mask, train: bool, rngs, label=None):
    """(logits [K], aux) of HIPT-LGP (its aggregator when the ViT-4K is frozen: inputs are then
    its [M,192] outputs) or of a baseline from hipt_jax.models.mil (``label`` turns on CLAM's
    instance loss)."""
    if _is_lgp(model):
        if model.freeze_local:
            return model.apply({"params": params}, x, mask, train, method=HIPTLGP.aggregate, rngs=rngs)
        return model.apply({"params": params}, x, mask, train, rngs=rngs)
    return model.apply({"params": params}, x, mask, train, label, rngs=rngs)


@functools.lru_cache(maxsize=16)
def _compiled(model, task: str, alpha: float, lr: float, weight_decay: float,
              accumulate_steps: int, bag_weight: float = 0.7):
    """Jitted functions of one (model, task, optimizer) setting, cached across trainers and folds
    so that k folds (and repeated runs in one process) compile once per bucket length."""

    def bag_loss(logits, label, censored):
        logits = logits[None]  # [K] -> [1,K]
        if task == "subtyping":
            return optax.softmax_cross_entropy_with_integer_labels(logits, label[None]).mean()
        return survival.nll_survival_loss(logits, label[None], censored[None], alpha)

    def logits_fn(params, x, mask, rng=None):
        train = rng is not None
        return _forward(model, params, x, mask, train, {"dropout": rng} if train else {})[0]

    def eval_fn(params, x, mask, label, censored):
        """Eval mode: (logits [K], bag loss, attention [L])."""
        logits, aux = _forward(model, params, x, mask, False, {})
        return logits, bag_loss(logits, label, censored), aux["attention"]

    def loss_fn(params, x, mask, label, censored, rng):
        inst_label = label if task == "subtyping" else None  # instance loss needs a class
        logits, aux = _forward(model, params, x, mask, True, {"dropout": rng}, inst_label)
        loss = bag_loss(logits, label, censored)
        if "instance_loss" in aux:  # CLAM: bag_weight * bag loss + (1 - bag_weight) * instance loss
            loss = bag_weight * loss + (1.0 - bag_weight) * aux["instance_loss"]
        return loss, logits

    def tx_for(params):
        return make_optimizer(params, lr, weight_decay, getattr(model, "freeze_local", False))

    def apply_update(grad_sum, opt_state, params):
        grads = jax.tree.map(lambda g: g / accumulate_steps, grad_sum)
        updates, opt_state = tx_for(params).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def accumulate(params, grad_sum, x, mask, label, censored, rng):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, mask, label, censored, rng)
        return (loss, logits), jax.tree.map(jnp.add, grad_sum, grads)

    def step(params, opt_state, x, mask, label, censored, rng):
        """accumulate_steps == 1: gradient and update in one device call."""
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, mask, label, censored, rng)
        params, opt_state = apply_update(grads, opt_state, params)
        return (loss, logits), params, opt_state

    return {
        "tx": tx_for,
        "logits": jax.jit(logits_fn),
        "eval": jax.jit(eval_fn),
        "accumulate": jax.jit(accumulate, donate_argnums=(1,)),
        "update": jax.jit(apply_update, donate_argnums=(0, 1)),
        "step": jax.jit(step, donate_argnums=(1,)),
    }


@dataclasses.dataclass
class FitResult:
    """What ``LGPTrainer.train`` returns. ``selected`` is the model to evaluate on test: the best
    epoch by the selection metric on validation, or the final epoch without validation items."""

    final: Any                       # params after the last epoch run
    selected: Any                    # params of ``selected_epoch``
    selected_epoch: int              # 0-based
    last_epoch: int                  # 0-based; < epochs - 1 when early stopping fired
    stopped_early: bool
    selected_by: str                 # "val_loss", "val_auc", ... or "final_epoch"
    history: list = dataclasses.field(default_factory=list)  # one dict per epoch
    note: str = ""                   # why the final epoch was taken although there was validation


class EarlyStopping:
    """CLAM's rule: an epoch whose validation score is at least the best so far (ties count)
    becomes the best and resets the counter; otherwise the counter grows, and training stops
    once it reaches ``patience`` at an epoch index (0-based) above ``min_epochs``.

    A non-finite score (an AUC on a val part with one class, a C-index without events) is
    never the best: taken once, no later ``score >= NaN`` would be true, and the first
    such epoch would be reported as selected by the metric."""

    def __init__(self, patience: int, min_epochs: int, higher_is_better: bool):
        self.patience, self.min_epochs, self.sign = patience, min_epochs, 1.0 if higher_is_better else -1.0
        self.best, self.counter = None, 0

    def __call__(self, epoch: int, value: float) -> tuple[bool, bool]:
        """-> (this epoch is the new best, stop now)."""
        score = self.sign * float(value)
        if np.isfinite(score) and (self.best is None or score >= self.best):
            self.best, self.counter = score, 0
            return True, False
        self.counter += 1
        return False, self.counter >= self.patience and epoch > self.min_epochs


# What ``evaluate`` reports per task (each also a possible ``select_metric``).
METRICS = {"subtyping": ("loss", "auc", "acc", "balanced_acc"), "survival": ("loss", "c_index")}


class LGPTrainer:
    """Training and evaluation of one model + task; ``fit`` trains one fold."""

    def __init__(self, model, cfg: TrainConfig):
        if cfg.task not in ("subtyping", "survival"):
            raise ValueError(f"unknown task {cfg.task!r}: expected subtyping or survival")
        self.model, self.cfg = model, cfg

    @property
    def _fns(self):
        c = self.cfg
        return _compiled(self.model, c.task, float(c.alpha_surv), float(c.lr), float(c.weight_decay),
                         int(c.accumulate_steps), float(c.bag_weight))

    # -- training -------------------------------------------------------------------------
    def _epoch_order(self, items: Sequence[Item], rng: np.random.Generator) -> np.ndarray:
        """Class-balanced sampling with replacement (CLAM's WeightedRandomSampler: weight N/N_c,
        N draws per epoch), or a plain shuffle."""
        n = len(items)
        if self.cfg.task == "subtyping" and self.cfg.balanced_sampling:
            labels = np.array([it.label for it in items])
            counts = np.bincount(labels)
            weights = n / counts[labels]
            return rng.choice(n, size=n, replace=True, p=weights / weights.sum())
        return rng.permutation(n)

    def fit(self, variables, items: Sequence[Item], epochs: Optional[int] = None,
            desc: Optional[str] = "train", log: Callable[[dict], None] | None = None):
        """Train on ``items`` (fresh optimizer state); returns the final params."""
        return self.train(variables, items, None, epochs, desc, log).final

    def train(self, variables, items: Sequence[Item], val_items: Optional[Sequence[Item]] = None,
              epochs: Optional[int] = None, desc: Optional[str] = "train",
              log: Callable[[dict], None] | None = None) -> FitResult:
        """Train on ``items``; with ``val_items`` evaluate them after every epoch, keep the params
        of the best epoch by ``cfg.select_metric`` and (``cfg.early_stopping``) stop by CLAM's
        rule. ``log`` gets {"epoch", "train/loss", "train/<metric>", "val/loss", "val/<metric>"}."""
        cfg, fns = self.cfg, self._fns
        params = variables["params"]
        opt_state = fns["tx"](params).init(params)
        padded = [pad_to_bucket(it.inputs, cfg.buckets) for it in items]
        targets = [(jnp.int32(it.label), jnp.float32(it.censored)) for it in items]
        np_rng = np.random.default_rng(cfg.seed)
        key = jax.random.PRNGKey(cfg.seed)
        epochs = cfg.epochs if epochs is None else epochs
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        metric = cfg.select_metric
        stopper = EarlyStopping(cfg.patience, cfg.min_epochs, higher_is_better=metric != "loss")
        best, best_epoch, history, stopped, epoch = None, -1, [], False, -1
        for epoch in tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True,
                          disable=desc is None):
            losses, logits, order, acc, n_acc = [], [], self._epoch_order(items, np_rng), None, 0
            # The next two items' inputs are copied to the device while this one trains.
            device_items = prefetch_to_device(order, lambda i: (i, jax.device_put(padded[i])))
            for i, (x, mask) in device_items:
                key, sub = jax.random.split(key)
                if cfg.accumulate_steps == 1:
                    (loss, out), params, opt_state = fns["step"](params, opt_state, x, mask, *targets[i], sub)
                else:
                    (loss, out), acc = fns["accumulate"](params, zeros() if acc is None else acc, x, mask,
                                                         *targets[i], sub)
                    n_acc += 1
                    if n_acc == cfg.accumulate_steps:
                        params, opt_state = fns["update"](acc, opt_state, params)
                        acc, n_acc = None, 0
                losses.append(loss)
                logits.append(out)
            if acc is not None:  # partial accumulation at the end of the epoch
                params, opt_state = fns["update"](acc, opt_state, params)
            train_items = [items[i] for i in order]
            row = {"epoch": epoch, "loss": float(np.mean(jax.device_get(losses)))}
            row.update({f"train/{k}": v for k, v in
                        self._metrics(np.stack(jax.device_get(logits)), train_items).items()})
            row["train/loss"] = row["loss"]
            if val_items:
                val = self.evaluate(params, val_items)[0]
                row.update({f"val/{k}": v for k, v in val.items()})
                if metric not in val:
                    raise ValueError(f"selection metric {metric!r} is not one of {sorted(val)}")
                improved, stopped = stopper(epoch, val[metric])
                if improved:
                    best, best_epoch = jax.device_get(params), epoch
            history.append(row)
            if log is not None:
                log(row)
            if stopped and cfg.early_stopping:
                break
        stopped = stopped and cfg.early_stopping
        if best is None:
            # No validation, or a metric that was not finite at any epoch: the final model, said so.
            note = (f"val {metric} was not finite at any epoch: the final epoch's model is used"
                    if val_items else "")
            return FitResult(params, params, epoch, epoch, stopped, "final_epoch", history, note)
        return FitResult(params, jax.tree.map(jnp.asarray, best), best_epoch, epoch, stopped,
                         f"val_{metric}", history)

    def predict(self, params, items: Sequence[Item]) -> np.ndarray:
        """Logits [N,K] (eval mode)."""
        logits_fn = self._fns["logits"]
        out = [logits_fn(params, *pad_to_bucket(it.inputs, self.cfg.buckets)) for it in items]
        return np.stack(jax.device_get(out))

    def predict_with_attention(self, params, items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray, list]:
        """(logits [N,K], bag losses [N], attention per item: [M_i] over its real instances)."""
        fn, out = self._fns["eval"], []
        for it in items:
            x, mask = pad_to_bucket(it.inputs, self.cfg.buckets)
            out.append(fn(params, x, mask, jnp.int32(max(it.label, 0)), jnp.float32(it.censored)))
        out = jax.device_get(out)
        logits = np.stack([o[0] for o in out])
        losses = np.array([o[1] for o in out], np.float64)
        return logits, losses, [np.asarray(o[2])[: len(it.inputs)] for o, it in zip(out, items)]

    def _metrics(self, logits: np.ndarray, items: Sequence[Item]) -> dict:  # names: METRICS
        if self.cfg.task == "subtyping":
            labels = np.array([it.label for it in items])
            probs = np.asarray(jax.nn.softmax(logits, axis=-1))
            preds = probs.argmax(1)
            return {"auc": metrics.auc(labels, probs), "acc": metrics.accuracy(labels, preds),
                    "balanced_acc": metrics.balanced_accuracy(labels, preds)}
        times = np.array([it.time for it in items])
        cens = np.array([it.censored for it in items])
        risk = np.asarray(survival.risk_score(jnp.asarray(logits)))
        return {"c_index": metrics.concordance_index(times, ~cens, risk)}

    def evaluate(self, params, items: Sequence[Item]) -> tuple[dict, dict]:
        """(metrics, predictions) on ``items``: subtyping AUC/accuracy/balanced accuracy;
        survival c-index; both the mean bag loss ("loss")."""
        logits, losses, attention = self.predict_with_attention(params, items)
        ids = [it.item_id for it in items]
        m = dict(self._metrics(logits, items), loss=float(losses.mean()))
        if self.cfg.task == "subtyping":
            labels = np.array([it.label for it in items])
            probs = np.asarray(jax.nn.softmax(logits, axis=-1))
            return m, {"ids": ids, "labels": labels, "probs": probs}
        times = np.array([it.time for it in items])
        cens = np.array([it.censored for it in items])
        risk = np.asarray(survival.risk_score(jnp.asarray(logits)))
        return m, {"ids": ids, "times": times, "censored": cens, "risk": risk}
