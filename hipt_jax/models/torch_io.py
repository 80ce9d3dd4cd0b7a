"""The reference's PyTorch ``.pth`` files <-> our Flax trees (import and export).

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
HIPT_LGP_FC (the reference's slide model): ``local_vit.*`` is a ViT-4K as above; the global
layers are torch Linear / TransformerEncoderLayer modules (see ``_LGP_RULES``). torch's
``in_proj_weight`` [3D, D] stacks [Wq; Wk; Wv] with heads contiguous inside each: the same
[q | k | v] head-major layout as our fused qkv, so it only needs the transpose.

``read_pth`` loads with ``torch.load(weights_only=True)`` and only DINO's argparse.Namespace
allow-listed, so no code from the pickle runs. Errors are one-line ``CheckpointError``s.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from hipt_jax.models import lgp
from hipt_jax.models.archs import ARCHITECTURES, build_vit, dummy_input, get_arch
from hipt_jax.models.checkpoint import (
    ARCH_FILE, CheckpointError, expected_param_shapes, flatten, shape_problems, short_list,
)


# ---------------------------------------------------------------------------------------------
# Name and layout mapping between the reference state dict and our Flax trees
# ---------------------------------------------------------------------------------------------
# (reference-name template, our path template, layout). Placeholders match the _FIELDS patterns.
# Layout says how the array changes: "same", "linear" (transpose [out,in] -> [in,out]),
# "conv" (OIHW -> HWIO), "gain" ([K,1] -> [K]).
_FIELDS = {"i": r"\d+", "norm": r"norm[12]", "sub": r"attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2"}
# How a torch module's weight/bias become ours: module type -> (weight name, weight layout).
_MODULES = {"linear": ("kernel", "linear"), "conv": ("kernel", "conv"), "norm": ("scale", "same")}


def _module_rules(modules) -> list[tuple[str, str, str]]:
    """[(reference module, our module, type)] -> rules for its .weight and .bias."""
    rules = []
    for ref, ours, kind in modules:
        weight, layout = _MODULES[kind]
        rules += [(f"{ref}.weight", f"{ours}/{weight}", layout), (f"{ref}.bias", f"{ours}/bias", "same")]
    return rules


_BACKBONE_RULES = [("cls_token", "cls_token", "same"), ("pos_embed", "pos_embed", "same")] + _module_rules([
    ("patch_embed.proj", "patch_embed", "conv"),                    # ViT-256
    ("phi.0", "phi/dense", "linear"),                               # ViT-4K
    ("blocks.{i}.{norm}", "encoder/blocks_{i}/{norm}", "norm"),
    ("blocks.{i}.{sub}", "encoder/blocks_{i}/{sub}", "linear"),
    ("norm", "norm", "norm"),
])
_HEAD_RULES = _module_rules([("mlp.{i}", "mlp_{i}", "linear")]) + [
    ("last_layer.weight_v", "last_layer/weight_v", "linear"),
    ("last_layer.weight_g", "last_layer/weight_g", "gain"),
]
# HIPT_LGP_FC: the local ViT-4K under "local_vit", then the global layers.
_LAYER = "global_transformer.layers.{i}"
_BLOCK = "global_transformer/blocks_{i}"
_LGP_RULES = [(f"local_vit.{ref}", f"local_vit/{ours}", layout) for ref, ours, layout in _BACKBONE_RULES] + [
    (f"{_LAYER}.self_attn.in_proj_weight", f"{_BLOCK}/attn/qkv/kernel", "linear"),
    (f"{_LAYER}.self_attn.in_proj_bias", f"{_BLOCK}/attn/qkv/bias", "same"),
] + _module_rules([
    ("global_phi.0", "global_phi", "linear"),
    (f"{_LAYER}.self_attn.out_proj", f"{_BLOCK}/attn/proj", "linear"),
    (f"{_LAYER}.linear1", f"{_BLOCK}/mlp/fc1", "linear"),
    (f"{_LAYER}.linear2", f"{_BLOCK}/mlp/fc2", "linear"),
    (f"{_LAYER}.{{norm}}", f"{_BLOCK}/{{norm}}", "norm"),
    ("global_attn_pool.attention_a.0", "attention_a", "linear"),
    ("global_attn_pool.attention_b.0", "attention_b", "linear"),
    ("global_attn_pool.attention_c", "attention_c", "linear"),
    ("global_rho.0", "global_rho", "linear"),
    ("classifier", "classifier", "linear"),
])


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


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _reference_shapes(our_shapes: dict[str, tuple], rules) -> dict[str, tuple[int, ...]]:
    """Our {path: shape} -> {reference name: shape in the reference layout}."""
    out = {}
    for path, shape in our_shapes.items():
        name, layout = _translate(path, rules, to_ours=False)
        out[name] = tuple(_to_reference(np.empty(shape, np.uint8), layout).shape)
    return out


def expected_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Reference name -> shape of every backbone tensor of an architecture (no weights built)."""
    shapes = jax.eval_shape(build_vit(config).init, jax.random.PRNGKey(0), dummy_input(config))
    return _reference_shapes({k: v.shape for k, v in flatten(shapes["params"]).items()}, _BACKBONE_RULES)


def infer_arch(backbone: dict[str, np.ndarray]) -> str:
    """Our architecture name for a stripped reference backbone state dict (by stem, depth, mlp)."""
    if "patch_embed.proj.weight" in backbone:
        stem = "pixels"
    elif "phi.0.weight" in backbone:
        stem = "features"
    else:
        raise CheckpointError("no patch_embed.proj.weight or phi.0.weight: not a ViT-256 or ViT-4K backbone "
                              f"(keys: {short_list(sorted(backbone))})")
    depth = len({k.split(".")[1] for k in backbone if k.startswith("blocks.")})
    fc1 = backbone.get("blocks.0.mlp.fc1.weight")
    mlp_dim = int(fc1.shape[0]) if fc1 is not None else None
    stem_weight = backbone["patch_embed.proj.weight" if stem == "pixels" else "phi.0.weight"]
    width = int(stem_weight.shape[0]) if getattr(stem_weight, "ndim", 0) >= 1 else None
    for name, make in ARCHITECTURES.items():
        cfg = make()
        if (cfg.stem == stem and cfg.depth == depth and (mlp_dim is None or cfg.mlp_dim == mlp_dim)
                and (width is None or cfg.width == width)):
            return name
    # A ViT-B (width 768) or another published ViT: say what was found and what is supported,
    # not only the fields that failed to match.
    supported = ", ".join(f"{n} (width {c.width}, depth {c.depth}, mlp {c.mlp_dim})"
                          for n, c in ((n, m()) for n, m in ARCHITECTURES.items()) if c.stem in ("pixels", "features"))
    kind = "ViT-256-like (patch_embed)" if stem == "pixels" else "ViT-4K-like (phi)"
    raise CheckpointError(f"a {kind} backbone of width {width}, depth {depth}, mlp {mlp_dim} is no supported "
                          f"architecture; supported: {supported}")


def check_backbone(backbone: dict[str, np.ndarray], config: ml_collections.ConfigDict, source: str) -> None:
    """Raise a one-line CheckpointError listing missing/unexpected keys and shape mismatches."""
    got = {k: tuple(v.shape) for k, v in backbone.items()}
    problems = shape_problems(expected_shapes(config), got)
    if problems:
        raise CheckpointError(f"{source}: not a valid {config.arch} backbone: " + "; ".join(problems))


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
    return _rename_all(flatten(variables["params"]), _BACKBONE_RULES, False,
                       "parameter {} has no reference name")


def reference_head_to_tree(head: dict[str, np.ndarray]) -> dict:
    """Stripped DINO head tensors ("mlp.0.weight", ...) -> our head tree (see module doc)."""
    return _unflatten(_rename_all(head, _HEAD_RULES, True, "unexpected DINO head key head.{}"))


def head_tree_to_reference(head: dict) -> dict[str, np.ndarray]:
    """Our head tree -> stripped DINO head tensors in the reference layouts."""
    return _rename_all(flatten(head), _HEAD_RULES, False, "head parameter {} has no reference name")


# ---------------------------------------------------------------------------------------------
# Reading reference .pth files
# ---------------------------------------------------------------------------------------------
def _sniff(path: str) -> None:
    """Fail early, with a clear message, on files torch.load would give a cryptic error for."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ARCH_FILE)):  # hipt-convert's own output given back to it
            raise CheckpointError(f"{path}: is a converted checkpoint already (it has {ARCH_FILE}), not a .pth; "
                                  "it loads as it is (--vit256/--vit4k), and --to-torch turns it back into a .pth")
        raise CheckpointError(f"{path}: is a directory without {ARCH_FILE} (not a converted checkpoint)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] == b"PK":
        _sniff_zip(path)
        return  # zip-format torch.save (read_pth)
    if head[:1] == b"\x80" or _is_safetensors(head, size):
        return  # a legacy pickle, or safetensors (read_pth)
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        kind = "an HDF5 file (a CLAM/TRIDENT feature bag, or Keras weights?)"
    else:
        try:
            head.decode("utf-8")
            kind = "a text file"
        except UnicodeDecodeError:
            kind = "an unknown binary format"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (looks like {kind})")


def _sniff_zip(path: str) -> None:
    """A zip that is not torch.save's (every torch.save zip holds ``<name>/data.pkl``): a NumPy
    .npz (saved JAX/Flax weights, an embeddings bag) got torch's "[enforce fail at
    inline_container.cc:180]"."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return  # torch.load's own error names it as truncated or corrupt
    if names and not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        npz = all(n.endswith(".npy") for n in names)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: "
                              + (f"a NumPy .npz archive ({short_list(sorted(names))})" if npz else
                                 f"a zip archive without torch.save's data.pkl ({short_list(sorted(names))})"))


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


# safetensors dtype names -> numpy (little-endian); BF16 is widened to float32 by hand.
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file -> {name: numpy array}, read directly (no safetensors package): the
    header length (8 bytes, little-endian), the JSON header {name: {dtype, shape, data_offsets}}
    and the raw little-endian tensor bytes after it. BF16 comes back as float32 (exact); every
    offset and size is checked against the file, so a cut or damaged file is refused by name."""
    import json

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        data = np.fromfile(f, np.uint8)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name}") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, which this reader does not take")
        np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
        if not 0 <= start <= end <= len(data) or end - start != int(np.prod(shape)) * np_dtype.itemsize:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (tensor {name}: bytes "
                                  f"{start}..{end} of {len(data)} for shape {tuple(shape)} {dtype})")
        array = data[start:end].view(np_dtype).reshape(shape)
        if dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array
    if not out:
        raise CheckpointError(f"{path}: safetensors file without tensors")
    return out


def _refuse_torchscript(path: str) -> None:
    """A TorchScript archive (torch.jit.save) is a zip like torch.save's, with the model's code
    in it: torch.load printed its jit warning and source line before refusing it; it is named
    here first."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return  # torch.load's own error names it as corrupt
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a state dict; in PyTorch, "
                              "torch.save(torch.jit.load(FILE).state_dict(), 'weights.pth') and convert that")


def read_pth(path: str) -> dict:
    """torch.load(weights_only=True) with DINO's argparse.Namespace allow-listed; numpy-free
    errors become CheckpointError. Returns the loaded object (usually a dict). A .safetensors
    file is read by ``read_safetensors`` (a plain state dict, no torch needed)."""
    _sniff(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head, os.path.getsize(path)):
        return read_safetensors(path)
    _refuse_torchscript(path)
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
        pickled = re.search(r"GLOBAL ([\w.]+)", str(e))
        if pickled:
            raise CheckpointError(
                f"{path}: holds pickled Python objects ({pickled.group(1)}; e.g. a whole nn.Module), which "
                "a weights-only load does not execute; save model.state_dict() with torch.save instead") from None
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    _check_zip_members(path)
    return obj


def _check_zip_members(path: str) -> None:
    """A zip-format .pth whose tensor bytes were damaged after it was written (zero-filled holes
    of an interrupted, preallocated copy) still loads: torch does not check the members' CRCs.
    CheckpointError naming the first damaged member."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # the legacy (pre-1.6) format has no checksums
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: the bytes of {bad} do not match their checksum "
                              "(a damaged or incomplete copy)")


def split_reference_state(obj: dict, which: str = "teacher", source: str = "") -> tuple[dict, dict, dict]:
    """Pick teacher/student (or a plain state dict), strip "module."/"backbone." prefixes.

    Returns (backbone, head, layout) with numpy arrays; layout records where the tensors came
    from ({"which": ..., "prefix": ...}) so --to-torch can write them back the same way.
    """
    if which not in ("teacher", "student"):
        raise CheckpointError(f"--which must be teacher or student, not {which!r}")
    flat_roles = {str(k).split(".", 1)[0] for k in obj} & {"teacher", "student"}
    outer = ""  # a flat dict of both networks: "teacher.backbone.blocks.0...", "student...."
    ignored: list[str] = []  # state-dict containers not taken (see below)
    if "teacher" in obj or "student" in obj:
        if which not in obj:  # e.g. a --to-torch file of a --which student conversion
            other = "student" if which == "teacher" else "teacher"
            raise CheckpointError(f"{source}: has no '{which}' entry (keys: {short_list(sorted(map(str, obj)))}): "
                                  f"it holds the {other} network; take it with hipt-convert --which {other}")
        state, container = obj[which], which
    elif flat_roles and all(hasattr(v, "shape") for v in obj.values()):
        if which not in flat_roles:
            raise CheckpointError(f"{source}: has no '{which}.*' tensors (prefixes: {sorted(flat_roles)})")
        outer = f"{which}."
        state = {k[len(outer):]: v for k, v in obj.items() if str(k).startswith(outer)}
        container = None
    else:
        # Trainer wrappers (Lightning's "state_dict", a {"model": ...} checkpoint) or a plain dict.
        wrapped = [k for k in _STATE_CONTAINERS if isinstance(obj.get(k), dict)]
        if which == "student":
            raise CheckpointError(f"{source}: holds one network (no teacher/student entries); --which student "
                                  "applies to DINO checkpoints")
        # Several (timm's "state_dict" beside "state_dict_ema", "model" beside its EMA): the
        # first in _STATE_CONTAINERS order, the others named in the layout ("ignored") so the
        # command says which network it took.
        state, container = (obj[wrapped[0]], wrapped[0]) if wrapped else (obj, None)
        ignored = wrapped[1:]
        if not wrapped and not _is_state_dict(obj):
            # A trainer's own name for it ({"net": ..., "optimizer": ..., "epoch": ...}): the one
            # entry that is a state dict of tensors is the network (an optimizer's is not).
            found = [k for k, v in obj.items() if _is_state_dict(v)]
            if len(found) > 1:
                raise CheckpointError(f"{source}: holds several state dicts ({short_list(sorted(map(str, found)))}); "
                                      "save the network to convert on its own (torch.save(ckpt[KEY], FILE))")
            if found:
                state, container = obj[found[0]], found[0]
            elif any(hasattr(v, "shape") for v in obj.values()):  # tensors beside other entries
                other = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not hasattr(v, "shape")]
                raise CheckpointError(f"{source}: holds {short_list(other)} beside its tensors; save the "
                                      "network's state_dict() alone")
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{source}: '{container or 'file'}' is not a state dict of tensors "
                              f"(keys: {short_list(sorted(map(str, state)) if isinstance(state, dict) else [])})")
    backbone, head, prefixes, cast = {}, {}, set(), set()
    original: dict[str, str] = {}  # stripped name -> key, to catch two networks in one dict
    for key, tensor in state.items():
        name, prefix = _strip_wrappers(key)
        array, dtype = _float32_array(tensor)
        if name in original:
            # one module reachable under two names (Lightning's self.model and self.backbone) saves
            # the same tensor twice: fine; different values are two networks in one dict
            in_head = name.startswith("head.")
            seen = (head if in_head else backbone).get(name[len("head."):] if in_head else name)
            if seen is not None and seen.shape == array.shape and np.array_equal(seen, array):
                continue
            raise CheckpointError(f"{source}: keys {original[name]!r} and {key!r} name the same tensor once "
                                  "prefixes are stripped but hold different values: two networks in one state dict?")
        original[name] = key
        if dtype:
            cast.add(dtype)
        if name.startswith("head."):
            head[name[len("head."):]] = array
        else:
            backbone[name] = array
            prefixes.add(prefix)
    if not backbone:
        raise CheckpointError(f"{source}: no backbone tensors in '{container or 'file'}'")
    bad = [k for k, a in {**backbone, **{"head." + k: a for k, a in head.items()}}.items()
           if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]
    if bad:
        raise CheckpointError(f"{source}: non-finite values (NaN/Inf) in {short_list(bad)}")
    prefix = outer + (prefixes.pop() if len(prefixes) == 1 else "")
    # "which" only where the file has teacher/student networks: a plain state dict has neither
    dino = container in ("teacher", "student") or bool(outer)
    return backbone, head, {"container": container, "prefix": prefix, "cast_from": sorted(cast),
                            "which": which if dino else None, **({"ignored": ignored} if ignored else {})}


# Where trainers put the state dict inside a checkpoint, and the prefixes their wrappers add to
# every key: DataParallel/DDP "module.", torch.compile "_orig_mod.", DINO's MultiCropWrapper
# "backbone.", Lightning modules "model.", encoder-decoder and SSL wrappers "encoder.".
_STATE_CONTAINERS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.")


def _is_state_dict(value) -> bool:
    """A non-empty dict of tensors (arrays)."""
    return isinstance(value, dict) and bool(value) and all(hasattr(v, "shape") for v in value.values())


def _strip_wrappers(key: str) -> tuple[str, str]:
    """"module._orig_mod.backbone.blocks.0..." -> ("blocks.0...", "module._orig_mod.backbone.")."""
    name, prefix = key, ""
    while name.startswith(_WRAPPER_PREFIXES):
        strip = next(p for p in _WRAPPER_PREFIXES if name.startswith(p))
        prefix, name = prefix + strip, name[len(strip):]
    return name, prefix


def _float32_array(tensor) -> tuple[np.ndarray, Optional[str]]:
    """A torch tensor (or array) -> numpy, floating point as float32 (the reference computes in
    fp32; numpy has no bfloat16); the second value names the dtype it was cast from, if any."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and str(tensor.dtype) != "torch.float32":
            return tensor.float().numpy(), str(tensor.dtype).replace("torch.", "")
        return tensor.numpy(), None
    array = np.asarray(tensor)
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        return array.astype(np.float32), str(array.dtype)
    return array, None


# The DINO head's tensors (3-layer MLP, then the weight-normalized last layer) and how their
# shapes chain: reference name -> (rows, columns) as names of dimensions.
_HEAD_SHAPES = {"mlp.0.weight": ("hidden", "embed"), "mlp.0.bias": ("hidden",),
                "mlp.2.weight": ("hidden", "hidden"), "mlp.2.bias": ("hidden",),
                "mlp.4.weight": ("bottleneck", "hidden"), "mlp.4.bias": ("bottleneck",),
                "last_layer.weight_v": ("out", "bottleneck"), "last_layer.weight_g": ("out", 1)}


def check_head(head: dict[str, np.ndarray], embed_dim: int, source: str) -> None:
    """Raise a one-line CheckpointError when a DINO head's tensors are missing, unexpected or do
    not chain (embed -> hidden -> hidden -> bottleneck -> out)."""
    missing = [k for k in _HEAD_SHAPES if k not in head]
    unexpected = [k for k in head if k not in _HEAD_SHAPES]
    problems = ([f"missing {short_list(['head.' + k for k in missing])}"] if missing else []) + (
        [f"unexpected {short_list(['head.' + k for k in unexpected])}"] if unexpected else [])
    if not problems:
        dims: dict = {"embed": embed_dim, 1: 1}
        for name, want in _HEAD_SHAPES.items():
            got = tuple(head[name].shape)
            if len(got) != len(want):
                problems.append(f"head.{name} has shape {got}")
                continue
            for size, dim in zip(got, want):
                if dims.setdefault(dim, size) != size:
                    problems.append(f"head.{name} has shape {got}, expected "
                                    f"{tuple(dims.get(d, '?') for d in want)}")
                    break
    if problems:
        raise CheckpointError(f"{source}: not a valid DINO head: " + "; ".join(problems))


def load_reference_backbone(path: str, which: str = "teacher", arch: str = "auto",
                            keep_head: bool = False) -> tuple[dict, ml_collections.ConfigDict, Optional[dict], dict]:
    """A reference .pth -> (variables, config, head tree or None, layout info). Validated."""
    obj = read_pth(path)
    backbone, head, layout = split_reference_state(obj, which, path)
    detected = infer_arch_or_explain(backbone, path)
    if arch != "auto" and dict(get_arch(arch)) != dict(get_arch(detected)):
        # same family, other size (vit256_tiny against vit256) too: one line, not every tensor
        have, want = get_arch(detected), get_arch(arch)
        raise CheckpointError(f"{path}: is a {detected} checkpoint (width {have.width}, depth {have.depth}), but "
                              f"--arch {arch} (width {want.width}, depth {want.depth}) was asked for")
    config = get_arch(detected if arch == "auto" else arch)
    check_backbone(backbone, config, path)
    if keep_head and not head:
        raise CheckpointError(f"{path}: --keep-head given but the file has no head.* tensors")
    if keep_head:
        check_head(head, int(config.width), path)
    elif head:
        layout = dict(layout, not_converted=_describe_head(head))
    head_tree = reference_head_to_tree(head) if keep_head else None
    return reference_to_variables(backbone), config, head_tree, layout


def _describe_head(head: dict[str, np.ndarray]) -> str:
    """What the head.* tensors left out of a conversion are, for the note that names them."""
    if set(head) == {"weight", "bias"}:
        return f"a classifier head (head.weight {tuple(head['weight'].shape)}, head.bias; not part of the backbone)"
    if set(head) <= set(_HEAD_SHAPES):
        return f"the DINO head ({len(head)} head.* tensors; --keep-head keeps it)"
    return f"{len(head)} head.* tensors ({short_list(['head.' + k for k in sorted(head)])})"


def infer_arch_or_explain(backbone: dict, source: str) -> str:
    try:
        return infer_arch(backbone)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Writing reference .pth files
# ---------------------------------------------------------------------------------------------
def reference_state(variables: dict, head: Optional[dict], meta: dict) -> dict:
    """Our backbone (+ DINO head) -> the reference's nested state dict of torch tensors, under
    the container and key prefix ``meta`` recorded at import (default: the released teacher)."""
    import torch

    container = meta.get("container", "teacher")
    prefix = meta.get("prefix", "backbone.")  # "backbone.", "module.backbone." or "" (plain)
    head_prefix = prefix.replace("backbone.", "") + "head."

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))

    state = {f"{prefix}{k}": tensor(v) for k, v in variables_to_reference(variables).items()}
    if head is not None:
        state.update({f"{head_prefix}{k}": tensor(v) for k, v in head_tree_to_reference(head).items()})
    return {container: state} if container else state


# ---------------------------------------------------------------------------------------------
# The reference's HIPT_LGP_FC state dicts
# ---------------------------------------------------------------------------------------------
def _depth(sd: Mapping[str, Any], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def import_lgp_state_dict(state_dict: Mapping[str, Any], source: str = "HIPT_LGP_FC state dict"
                          ) -> tuple[dict, dict]:
    """Reference HIPT_LGP_FC state dict (torch tensors or numpy) -> (variables, info).

    info = {"n_classes", "local_arch", "local_depth", "global_depth", "arch"}; ``arch`` is the
    ``lgp.lgp_arch`` config (``lgp.build_lgp(info["arch"])`` is the model; ``checkpoint.save``
    stores it). The local ViT-4K architecture is recognised from its tensors. A "module."
    prefix (DataParallel) is stripped. Raises CheckpointError naming missing/unexpected keys.
    """
    sd = {}
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        sd[k] = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
    if "classifier.weight" not in sd:
        raise CheckpointError(f"{source}: not a HIPT_LGP_FC state dict: missing keys: classifier.weight")
    local = {k[len("local_vit."):]: v for k, v in sd.items() if k.startswith("local_vit.")}
    local_arch = infer_arch_or_explain(local, f"{source} local_vit")
    model = lgp.HIPTLGP(n_classes=int(sd["classifier.weight"].shape[0]), local_arch=local_arch,
                        global_depth=_depth(sd, "global_transformer.layers."))
    config = lgp.lgp_arch(model)
    ours = {k[len("params/"):]: v for k, v in expected_param_shapes("hipt_lgp", config).items()}
    problems = shape_problems(_reference_shapes(ours, _LGP_RULES), {k: v.shape for k, v in sd.items()})
    if problems:
        raise CheckpointError(f"{source}: not a valid HIPT_LGP_FC state dict: " + "; ".join(problems))
    params = _unflatten(_rename_all(sd, _LGP_RULES, True, "unexpected key {}"))
    info = {"n_classes": model.n_classes, "local_arch": local_arch, "local_depth": get_arch(local_arch).depth,
            "global_depth": model.global_depth, "arch": config}
    return {"params": params}, info
