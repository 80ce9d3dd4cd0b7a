"""Backbone checkpoints: our Orbax format, and the reference's PyTorch layout.

On disk, a converted or exported backbone is a directory::

    DIR/arch.json   {"format": "hipt-jax-backbone", "arch": "vit256", "config": {...},
                     "has_head": false, "meta": {...}}
    DIR/state/      Orbax checkpoint of {"params": <Flax params>, ["head": <DINO head>]}

``load_backbone`` also accepts a released ``.pth`` file directly (converted in memory; needs
torch). Everything a user can get wrong ends in a one-line ``CheckpointError`` that names the
file and the problem (missing keys, unexpected keys, shape mismatches, wrong architecture,
truncated or non-checkpoint file).

Layouts (reference name -> our tree; Linear [out,in] -> kernel [in,out], Conv OIHW -> HWIO):
    cls_token, pos_embed                 -> params/cls_token, params/pos_embed
    patch_embed.proj.{weight,bias}       -> params/patch_embed/{kernel,bias}      (ViT-256)
    phi.0.{weight,bias}                  -> params/phi/dense/{kernel,bias}        (ViT-4K)
    blocks.I.normN.{weight,bias}         -> params/encoder/blocks_I/normN/{scale,bias}
    blocks.I.attn.{qkv,proj}.*           -> params/encoder/blocks_I/attn/{qkv,proj}/{kernel,bias}
    blocks.I.mlp.{fc1,fc2}.*             -> params/encoder/blocks_I/mlp/{fc1,fc2}/{kernel,bias}
    norm.{weight,bias}                   -> params/norm/{scale,bias}
DINO head (kept with ``hipt-convert --keep-head``, for resuming pretraining):
    head.mlp.{0,2,4}.{weight,bias}       -> head/mlp_{0,2,4}/{kernel [in,out], bias}
    head.last_layer.weight_v [K,256]     -> head/last_layer/weight_v [256,K]  (kernel layout)
    head.last_layer.weight_g [K,1]       -> head/last_layer/weight_g [K]
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hipt_jax.models.configs import ARCHITECTURES, build_vit, dummy_input, get_arch

FORMAT = "hipt-jax-backbone"
ARCH_FILE = "arch.json"
STATE_DIR = "state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and problem."""


# ---------------------------------------------------------------------------------------------
# Name and layout mapping between the reference state dict and our Flax trees
# ---------------------------------------------------------------------------------------------
# (reference-name template, our path template, layout). Placeholders match the _FIELDS patterns.
# Layout says how the array changes: "same", "linear" (transpose [out,in] -> [in,out]),
# "conv" (OIHW -> HWIO), "gain" ([K,1] -> [K]).
_FIELDS = {"i": r"\d+", "norm": r"norm[12]", "sub": r"attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2"}
_BACKBONE_RULES = [
    ("cls_token", "cls_token", "same"),
    ("pos_embed", "pos_embed", "same"),
    ("patch_embed.proj.weight", "patch_embed/kernel", "conv"),
    ("patch_embed.proj.bias", "patch_embed/bias", "same"),
    ("phi.0.weight", "phi/dense/kernel", "linear"),
    ("phi.0.bias", "phi/dense/bias", "same"),
    ("blocks.{i}.{norm}.weight", "encoder/blocks_{i}/{norm}/scale", "same"),
    ("blocks.{i}.{norm}.bias", "encoder/blocks_{i}/{norm}/bias", "same"),
    ("blocks.{i}.{sub}.weight", "encoder/blocks_{i}/{sub}/kernel", "linear"),
    ("blocks.{i}.{sub}.bias", "encoder/blocks_{i}/{sub}/bias", "same"),
    ("norm.weight", "norm/scale", "same"),
    ("norm.bias", "norm/bias", "same"),
]
_HEAD_RULES = [
    ("mlp.{i}.weight", "mlp_{i}/kernel", "linear"),
    ("mlp.{i}.bias", "mlp_{i}/bias", "same"),
    ("last_layer.weight_v", "last_layer/weight_v", "linear"),
    ("last_layer.weight_g", "last_layer/weight_g", "gain"),
]


def _template_regex(template: str, sep: str) -> re.Pattern:
    """"blocks.{i}.{sub}.weight" -> regex with named groups; ``sep`` is "." or "/" (inside a
    field value the reference's "." becomes our "/", e.g. attn.qkv <-> attn/qkv)."""
    parts = re.split(r"(\{\w+\})", template)
    regex = ""
    for part in parts:
        if part.startswith("{"):
            field = part[1:-1]
            regex += f"(?P<{field}>{_FIELDS[field].replace(chr(92) + '.', re.escape(sep))})"
        else:
            regex += re.escape(part)
    return re.compile(regex)


def _translate(name: str, rules, to_ours: bool) -> Optional[tuple[str, str]]:
    """Reference name -> (our path, layout), or our path -> (reference name, layout)."""
    src_sep, dst_sep = (".", "/") if to_ours else ("/", ".")
    for ref_t, our_t, layout in rules:
        src_t, dst_t = (ref_t, our_t) if to_ours else (our_t, ref_t)
        m = _template_regex(src_t, src_sep).fullmatch(name)
        if m:
            values = {k: v.replace(src_sep, dst_sep) for k, v in m.groupdict().items()}
            return dst_t.format(**values), layout
    return None


# layout -> (reference -> ours, ours -> reference); other layouts are stored as they are.
_LAYOUTS = {
    "linear": (lambda a: a.T, lambda a: a.T),                                  # [out,in] <-> [in,out]
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "gain": (lambda a: a.reshape(-1), lambda a: a.reshape(-1, 1)),             # [out,1] <-> [out]
}


def _to_ours(array: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(_LAYOUTS[layout][0](array)) if layout in _LAYOUTS else array


def _to_reference(array: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(_LAYOUTS[layout][1](array)) if layout in _LAYOUTS else array


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict) or hasattr(value, "items") and not hasattr(value, "shape"):
            out.update(_flatten(dict(value), path))
        else:
            out[path] = value
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def expected_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Reference name -> shape of every backbone tensor of an architecture (no weights built)."""
    shapes = jax.eval_shape(build_vit(config).init, jax.random.PRNGKey(0), dummy_input(config))
    out = {}
    for path, leaf in _flatten(shapes["params"]).items():
        name, layout = _translate(path, _BACKBONE_RULES, to_ours=False)
        out[name] = tuple(_to_reference(np.empty(leaf.shape, np.uint8), layout).shape)
    return out


def infer_arch(backbone: dict[str, np.ndarray]) -> str:
    """Our architecture name for a stripped reference backbone state dict (by stem, depth, mlp)."""
    if "patch_embed.proj.weight" in backbone:
        stem = "pixels"
    elif "phi.0.weight" in backbone:
        stem = "features"
    else:
        raise CheckpointError("no patch_embed.proj.weight or phi.0.weight: not a ViT-256 or ViT-4K backbone")
    depth = len({k.split(".")[1] for k in backbone if k.startswith("blocks.")})
    fc1 = backbone.get("blocks.0.mlp.fc1.weight")
    mlp_dim = int(fc1.shape[0]) if fc1 is not None else None
    for name, make in ARCHITECTURES.items():
        cfg = make()
        if cfg.stem == stem and cfg.depth == depth and (mlp_dim is None or cfg.mlp_dim == mlp_dim):
            return name
    raise CheckpointError(f"no known architecture has stem={stem} depth={depth} mlp_dim={mlp_dim}")


def check_backbone(backbone: dict[str, np.ndarray], config: ml_collections.ConfigDict, source: str) -> None:
    """Raise a one-line CheckpointError listing missing/unexpected keys and shape mismatches."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(backbone))
    unexpected = sorted(set(backbone) - set(expected))
    mismatched = [f"{k} {tuple(backbone[k].shape)} != {expected[k]}" for k in sorted(expected)
                  if k in backbone and tuple(backbone[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_short_list(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: not a valid {config.arch} backbone: " + "; ".join(problems))


def _short_list(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _rename_all(items: dict, rules, to_ours: bool, unknown: str) -> dict[str, np.ndarray]:
    """Translate every name with ``rules`` and convert its array's layout; ``unknown``
    (formatted with the name) is the error for a name no rule covers."""
    out = {}
    for name, array in items.items():
        hit = _translate(name, rules, to_ours=to_ours)
        if hit is None:
            raise CheckpointError(unknown.format(name))
        out[hit[0]] = (_to_ours if to_ours else _to_reference)(np.asarray(array), hit[1])
    return out


def reference_to_variables(backbone: dict[str, np.ndarray]) -> dict:
    """Stripped reference backbone state dict (numpy) -> Flax variables {"params": ...}."""
    return {"params": _unflatten(_rename_all(backbone, _BACKBONE_RULES, True, "unexpected key {}"))}


def variables_to_reference(variables: dict) -> dict[str, np.ndarray]:
    """Flax variables -> stripped reference backbone state dict (numpy, reference layouts)."""
    return _rename_all(_flatten(variables["params"]), _BACKBONE_RULES, False,
                       "parameter {} has no reference name")


def reference_head_to_tree(head: dict[str, np.ndarray]) -> dict:
    """Stripped DINO head tensors ("mlp.0.weight", ...) -> our head tree (see module doc)."""
    return _unflatten(_rename_all(head, _HEAD_RULES, True, "unexpected DINO head key head.{}"))


def head_tree_to_reference(head: dict) -> dict[str, np.ndarray]:
    """Our head tree -> stripped DINO head tensors in the reference layouts."""
    return _rename_all(_flatten(head), _HEAD_RULES, False, "head parameter {} has no reference name")


# ---------------------------------------------------------------------------------------------
# Reading reference .pth files
# ---------------------------------------------------------------------------------------------
def _sniff(path: str) -> None:
    """Fail early, with a clear message, on files torch.load would give a cryptic error for."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory without {ARCH_FILE} (not a converted checkpoint)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return  # zip-format torch.save, or a legacy pickle
    try:
        head.decode("utf-8")
        kind = "a text file"
    except UnicodeDecodeError:
        kind = "an unknown binary format"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (looks like {kind})")


def read_pth(path: str) -> dict:
    """torch.load(weights_only=True) with DINO's argparse.Namespace allow-listed; numpy-free
    errors become CheckpointError. Returns the loaded object (usually a dict)."""
    _sniff(path)
    try:
        import argparse

        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .pth files needs torch (pip install 'hipt-jax[convert]')") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/unpickler errors: all mean "unusable file"
        # First sentence only: torch appends paragraphs of advice to zip errors.
        msg = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        if "central directory" in msg or "EOF" in msg or "truncated" in msg.lower() or "failed reading" in msg:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg})") from None
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def split_reference_state(obj: dict, which: str = "teacher", source: str = "") -> tuple[dict, dict, dict]:
    """Pick teacher/student (or a plain state dict), strip "module."/"backbone." prefixes.

    Returns (backbone, head, layout) with numpy arrays; layout records where the tensors came
    from ({"which": ..., "prefix": ...}) so --to-torch can write them back the same way.
    """
    if which not in ("teacher", "student"):
        raise CheckpointError(f"--which must be teacher or student, not {which!r}")
    if "teacher" in obj or "student" in obj:
        if which not in obj:
            raise CheckpointError(f"{source}: has no '{which}' entry (keys: {_short_list(sorted(map(str, obj)))})")
        state, container = obj[which], which
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state, container = obj["state_dict"], "state_dict"
    else:
        state, container = obj, None  # a plain state dict
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{source}: '{container or 'file'}' is not a state dict of tensors")
    backbone, head, prefixes = {}, {}, set()
    for key, tensor in state.items():
        name = key
        prefix = ""
        for strip in ("module.", "backbone."):
            if name.startswith(strip):
                prefix += strip
                name = name[len(strip):]
        array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
        if name.startswith("head."):
            head[name[len("head."):]] = array
        else:
            backbone[name] = array
            prefixes.add(prefix)
    if not backbone:
        raise CheckpointError(f"{source}: no backbone tensors in '{container or 'file'}'")
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    return backbone, head, {"container": container, "prefix": prefix}


def load_reference_backbone(path: str, which: str = "teacher", arch: str = "auto",
                            keep_head: bool = False) -> tuple[dict, ml_collections.ConfigDict, Optional[dict], dict]:
    """A reference .pth -> (variables, config, head tree or None, layout info). Validated."""
    obj = read_pth(path)
    backbone, head, layout = split_reference_state(obj, which, path)
    detected = infer_arch_or_explain(backbone, path)
    if arch != "auto" and get_arch(arch).arch != get_arch(detected).arch:
        raise CheckpointError(f"{path}: is a {get_arch(detected).arch} checkpoint, but --arch {arch} was asked for")
    config = get_arch(detected if arch == "auto" else arch)
    check_backbone(backbone, config, path)
    head_tree = reference_head_to_tree(head) if keep_head and head else None
    if keep_head and not head:
        raise CheckpointError(f"{path}: --keep-head given but the file has no head.* tensors")
    return reference_to_variables(backbone), config, head_tree, layout


def infer_arch_or_explain(backbone: dict, source: str) -> str:
    try:
        return infer_arch(backbone)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Our Orbax format
# ---------------------------------------------------------------------------------------------
def _config_name(config: ml_collections.ConfigDict) -> str:
    for name, make in ARCHITECTURES.items():
        if make().to_dict() == config.to_dict():
            return name
    return config.arch


def save_backbone(path: str, variables: dict, config: ml_collections.ConfigDict,
                  head: Optional[dict] = None, meta: Optional[dict] = None) -> str:
    """Write ``variables`` ({"params": ...}), optional DINO ``head`` tree and ``meta`` (any
    JSON-able dict, e.g. source file, training step) as DIR/arch.json + DIR/state (Orbax).

    ``path`` must not exist or be an empty directory. Returns the absolute directory.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointError(f"{path}: already exists and is not an empty directory")
    os.makedirs(path, exist_ok=True)
    tree = {"params": jax.tree.map(np.asarray, dict(variables["params"]))}
    if head is not None:
        tree["head"] = jax.tree.map(np.asarray, dict(head))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, STATE_DIR), tree)
    info = {
        "format": FORMAT,
        "version": 1,
        "arch": config.arch,
        "name": _config_name(config),
        "config": config.to_dict(),
        "has_head": head is not None,
        "meta": meta or {},
    }
    with open(os.path.join(path, ARCH_FILE), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return path


def read_arch(path: str) -> dict:
    """The arch.json of a converted directory (validated)."""
    arch_file = os.path.join(path, ARCH_FILE)
    try:
        with open(arch_file) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {ARCH_FILE} (not a hipt-jax checkpoint directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{arch_file}: invalid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "config" not in info:
        raise CheckpointError(f"{arch_file}: not a {FORMAT} description")
    return info


def load_checkpoint_dir(path: str) -> tuple[dict, ml_collections.ConfigDict, Optional[dict], dict]:
    """DIR -> (variables, config, head or None, arch.json dict); arrays are numpy."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    info = read_arch(path)
    config = ml_collections.ConfigDict(info["config"])
    state = os.path.join(path, STATE_DIR)
    if not os.path.isdir(state):
        raise CheckpointError(f"{path}: missing {STATE_DIR}/ (incomplete conversion?)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(state)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{state}: cannot restore Orbax checkpoint ({msg})") from None
    variables = {"params": tree["params"]}
    check_backbone(variables_to_reference(variables), config, path)
    return variables, config, tree.get("head"), info


def load_backbone(path: str, expect_arch: Optional[str] = None) -> tuple[dict, ml_collections.ConfigDict]:
    """A converted directory or a reference .pth (teacher) -> (variables, config).

    ``expect_arch`` ("vit256" or "vit4k") turns a file of the other architecture into a clear
    CheckpointError instead of a shape error deep inside the model.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        variables, config, _, _ = load_checkpoint_dir(path)
    else:
        variables, config, _, _ = load_reference_backbone(path)
    if expect_arch is not None and config.arch != get_arch(expect_arch).arch:
        raise CheckpointError(f"{path}: is a {config.arch} checkpoint, expected {get_arch(expect_arch).arch}")
    # On device once, so jitted calls do not copy the weights from host memory every time.
    return jax.tree.map(jnp.asarray, variables), config
