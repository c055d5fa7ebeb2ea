"""Real-size benchmark models (random weights), each in Flax (Linen) and
rebuilt in Keras with the same weights (BatchNorm folded) for TensorFlow's
converter, as bench/_keras_models.py does for the small ones:

* ``mobilenet_v2``: MobileNetV2, alpha 1.0, 224x224x3, 1000 classes.
* ``resnet50``: ResNet-50 (bottleneck blocks 3-4-6-3), 224x224x3.
* ``vit_s16``: ViT-S/16 (12 pre-LN layers, d 384, 6 heads, MLP 1536),
  224x224x3; mean-pooled tokens (no class token) into the head.
* ``bert``: a BERT-style encoder (4 post-LN layers, d 512, 8 heads, FFN
  2048, exact GELU, LayerNorm eps 1e-12) on float input embeddings
  (1, 128, 512); the output is the last hidden states.
* ``bert_tiny``: the same encoder at 2 layers, d 64, seq 32 (for
  bench/ptq_algorithms.py and tests).

Bench-only: the Keras half imports TensorFlow; qlite never imports this.
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

BN_EPS = 1e-5
VIT_LN_EPS = 1e-6
BERT_LN_EPS = 1e-12

MBV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
R50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def _bn(name):
  return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=name)


class MobileNetV2(nn.Module):
  classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.relu6(_bn("stem_bn")(nn.Conv(32, (3, 3), 2, use_bias=False,
                                        name="stem")(x)))
    i = 0
    for t, c, n, s in MBV2_CFG:
      for j in range(n):
        stride = s if j == 0 else 1
        c_in = x.shape[-1]
        y = x
        if t != 1:
          y = nn.relu6(_bn(f"b{i}_ebn")(nn.Conv(c_in * t, (1, 1),
                                               use_bias=False,
                                               name=f"b{i}_expand")(y)))
        h = y.shape[-1]
        y = nn.relu6(_bn(f"b{i}_dbn")(nn.Conv(
            h, (3, 3), stride, feature_group_count=h, use_bias=False,
            name=f"b{i}_dw")(y)))
        y = _bn(f"b{i}_pbn")(nn.Conv(c, (1, 1), use_bias=False,
                                     name=f"b{i}_project")(y))
        x = x + y if stride == 1 and c_in == c else y
        i += 1
    x = nn.relu6(_bn("head_bn")(nn.Conv(1280, (1, 1), use_bias=False,
                                        name="head")(x)))
    return nn.Dense(self.classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class ResNet50(nn.Module):
  classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_bn("stem_bn")(nn.Conv(64, (7, 7), 2, use_bias=False,
                                       name="stem")(x)))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    i = 0
    for width, n, s in R50_STAGES:
      for j in range(n):
        stride = s if j == 0 else 1
        y = nn.relu(_bn(f"b{i}_bn1")(nn.Conv(width, (1, 1), use_bias=False,
                                             name=f"b{i}_c1")(x)))
        y = nn.relu(_bn(f"b{i}_bn2")(nn.Conv(width, (3, 3), stride,
                                             use_bias=False,
                                             name=f"b{i}_c2")(y)))
        y = _bn(f"b{i}_bn3")(nn.Conv(width * 4, (1, 1), use_bias=False,
                                     name=f"b{i}_c3")(y))
        if j == 0:
          x = _bn(f"b{i}_sbn")(nn.Conv(width * 4, (1, 1), stride,
                                       use_bias=False, name=f"b{i}_sc")(x))
        x = nn.relu(x + y)
        i += 1
    return nn.Dense(self.classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class _Attention(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    hd = d // self.heads
    q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, self.heads, hd)
               for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return nn.Dense(d, name="out")(y.reshape(b, t, d))


class ViT(nn.Module):
  layers: int = 12
  dim: int = 384
  heads: int = 6
  mlp: int = 1536
  patch: int = 16
  classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.dim, (self.patch, self.patch), self.patch,
                name="patch")(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    x = x + self.param("pos", nn.initializers.normal(0.02), (h * w, d))
    for i in range(self.layers):
      y = nn.LayerNorm(VIT_LN_EPS, name=f"l{i}_ln1")(x)
      x = x + _Attention(self.heads, name=f"l{i}_attn")(y)
      y = nn.LayerNorm(VIT_LN_EPS, name=f"l{i}_ln2")(x)
      y = nn.gelu(nn.Dense(self.mlp, name=f"l{i}_fc1")(y))
      x = x + nn.Dense(d, name=f"l{i}_fc2")(y)
    x = nn.LayerNorm(VIT_LN_EPS, name="ln")(x)
    return nn.Dense(self.classes, name="fc")(jnp.mean(x, axis=1))


class Bert(nn.Module):
  layers: int = 4
  dim: int = 512
  heads: int = 8
  ffn: int = 2048

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(BERT_LN_EPS, name="emb_ln")(x)
    for i in range(self.layers):
      x = nn.LayerNorm(BERT_LN_EPS, name=f"l{i}_ln1")(
          x + _Attention(self.heads, name=f"l{i}_attn")(x))
      y = nn.gelu(nn.Dense(self.ffn, name=f"l{i}_fc1")(x), approximate=False)
      x = nn.LayerNorm(BERT_LN_EPS, name=f"l{i}_ln2")(
          x + nn.Dense(self.dim, name=f"l{i}_fc2")(y))
    return x


SPECS = {
    # name: (constructor, input shape without batch, input kind)
    "mobilenet_v2": (MobileNetV2, (224, 224, 3), "uniform"),
    "resnet50": (ResNet50, (224, 224, 3), "uniform"),
    "vit_s16": (ViT, (224, 224, 3), "uniform"),
    "bert": (Bert, (128, 512), "normal"),
    "bert_tiny": (lambda: Bert(layers=2, dim=64, heads=4, ffn=256), (32, 64),
                  "normal"),
}


def _inputs(kind, shape, seed, n):
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    return [rng.uniform(0, 1, (1,) + shape).astype(np.float32)
            for _ in range(n)]
  return [rng.normal(0, 1, (1,) + shape).astype(np.float32) for _ in range(n)]


def _spread_layernorms(params, rng):
  """Trained-looking LayerNorms: scale ~ 1 with a few outlier channels,
  small biases (random init leaves scale 1, bias 0)."""
  def visit(p):
    for k, v in p.items():
      if isinstance(v, dict) and set(v) == {"scale", "bias"}:
        c = v["scale"].shape[0]
        s = rng.lognormal(0.0, 0.3, c).astype(np.float32)
        s[rng.choice(c, max(1, c // 64), replace=False)] *= 6.0
        v["scale"] = s
        v["bias"] = rng.normal(0, 0.1, c).astype(np.float32)
      elif isinstance(v, dict):
        visit(v)
  visit(params)


@dataclasses.dataclass
class Case:
  name: str
  variables: dict
  calib: list
  example_args: tuple
  eval_x: np.ndarray
  ref: np.ndarray

  def save(self, path):
    with open(path, "wb") as f:
      pickle.dump(self, f)

  @staticmethod
  def load(path):
    with open(path, "rb") as f:
      return pickle.load(f)


def model(name):
  return SPECS[name][0]()


def build(name: str, calib_n: int = 8, eval_n: int = 8, seed: int = 0) -> Case:
  """Random-weight case: variables (BatchNorms / LayerNorms randomised),
  ``calib_n`` batch-1 calibration batches, ``eval_n`` held-out rows (another
  seed) and the float JAX outputs on them."""
  from qlite.zoo import base
  make, shape, kind = SPECS[name]
  m = make()
  calib = _inputs(kind, shape, seed + 1, calib_n)
  eval_x = np.concatenate(_inputs(kind, shape, seed + 9001, eval_n))
  v = base.init_linen(m, seed, calib[0])
  v = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), v)
  if "batch_stats" in v:
    v = base.randomize_batchnorm_linen(v, seed + 2)
    v = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), v)
  else:
    _spread_layernorms(v["params"], np.random.default_rng(seed + 3))
  fn = jax.jit(lambda x: m.apply(v, x))
  ref = np.concatenate([np.asarray(fn(eval_x[i:i + 1]))
                        for i in range(len(eval_x))])
  return Case(name, v, calib, (calib[0],), eval_x, ref)


class _Item:
  """What bench/ptq_algorithms.py measures."""

  def __init__(self, case):
    self.name, self.model, self.variables = case.name, model(case.name), \
        case.variables
    self.calib, self.example = case.calib, case.example_args
    self.eval_x, self.ref = case.eval_x, case.ref


def bert_item(tiny: bool = True):
  return _Item(build("bert_tiny" if tiny else "bert", calib_n=16, eval_n=16))


# ---------------------------------------------------------------------------
# Keras rebuilds (TensorFlow's converter)

def _L():
  import keras
  return keras.layers


def _fold(p, s, bnp):
  sc = p[bnp]["scale"] / np.sqrt(s[bnp]["var"] + BN_EPS)
  return sc, p[bnp]["bias"] - s[bnp]["mean"] * sc


def _kconv(x, kernel, bias, stride=1, act=None, depthwise=False):
  L = _L()
  if depthwise:
    layer = L.DepthwiseConv2D(kernel.shape[:2], strides=stride,
                              padding="same")
    y = layer(x)
    layer.set_weights([np.transpose(kernel, (0, 1, 3, 2)), bias])
  else:
    layer = L.Conv2D(kernel.shape[-1], kernel.shape[:2], strides=stride,
                     padding="same")
    y = layer(x)
    layer.set_weights([kernel, bias])
  if act == "relu":
    return L.ReLU()(y)
  if act == "relu6":
    return L.ReLU(max_value=6.0)(y)
  return y


def _conv_bn(x, p, s, conv, bnp, stride=1, act=None, depthwise=False):
  sc, b = _fold(p, s, bnp)
  return _kconv(x, (p[conv]["kernel"] * sc).astype(np.float32),
                b.astype(np.float32), stride, act, depthwise)


def _kdense(x, w):
  layer = _L().Dense(w["kernel"].shape[-1])
  y = layer(x)
  layer.set_weights([w["kernel"], w["bias"]])
  return y


def _kln(x, p, eps):
  layer = _L().LayerNormalization(epsilon=eps)
  y = layer(x)
  layer.set_weights([p["scale"], p["bias"]])
  return y


def _kattn(x, p, heads):
  from keras import ops
  L = _L()
  t, d = x.shape[1], x.shape[2]
  hd = d // heads
  q, k, v = (L.Reshape((t, heads, hd))(_kdense(x, p[n]))
             for n in ("query", "key", "value"))
  logits = ops.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
  y = ops.einsum("bhqk,bkhd->bqhd", ops.softmax(logits, axis=-1), v)
  return _kdense(L.Reshape((t, d))(y), p["out"])


def _k_mobilenet_v2(v, x, cfg):
  L = _L()
  p, s = v["params"], v["batch_stats"]
  x = _conv_bn(x, p, s, "stem", "stem_bn", 2, "relu6")
  i = 0
  for t, c, n, st in MBV2_CFG:
    for j in range(n):
      stride = st if j == 0 else 1
      c_in = x.shape[-1]
      y = x
      if t != 1:
        y = _conv_bn(y, p, s, f"b{i}_expand", f"b{i}_ebn", 1, "relu6")
      y = _conv_bn(y, p, s, f"b{i}_dw", f"b{i}_dbn", stride, "relu6",
                   depthwise=True)
      y = _conv_bn(y, p, s, f"b{i}_project", f"b{i}_pbn")
      x = L.Add()([x, y]) if stride == 1 and c_in == c else y
      i += 1
  x = _conv_bn(x, p, s, "head", "head_bn", 1, "relu6")
  return _kdense(L.GlobalAveragePooling2D()(x), p["fc"])


def _k_resnet50(v, x, cfg):
  L = _L()
  p, s = v["params"], v["batch_stats"]
  x = _conv_bn(x, p, s, "stem", "stem_bn", 2, "relu")
  x = L.MaxPooling2D(3, 2, padding="same")(x)
  i = 0
  for width, n, st in R50_STAGES:
    for j in range(n):
      stride = st if j == 0 else 1
      y = _conv_bn(x, p, s, f"b{i}_c1", f"b{i}_bn1", 1, "relu")
      y = _conv_bn(y, p, s, f"b{i}_c2", f"b{i}_bn2", stride, "relu")
      y = _conv_bn(y, p, s, f"b{i}_c3", f"b{i}_bn3")
      if j == 0:
        x = _conv_bn(x, p, s, f"b{i}_sc", f"b{i}_sbn", stride)
      x = L.ReLU()(L.Add()([x, y]))
      i += 1
  return _kdense(L.GlobalAveragePooling2D()(x), p["fc"])


def _k_vit(v, x, cfg):
  from keras import ops
  L = _L()
  p = v["params"]
  x = _kconv(x, p["patch"]["kernel"], p["patch"]["bias"], cfg.patch)
  n = x.shape[1] * x.shape[2]
  x = L.Reshape((n, cfg.dim))(x)
  x = x + p["pos"]
  for i in range(cfg.layers):
    y = _kln(x, p[f"l{i}_ln1"], VIT_LN_EPS)
    x = x + _kattn(y, p[f"l{i}_attn"], cfg.heads)
    y = _kln(x, p[f"l{i}_ln2"], VIT_LN_EPS)
    y = ops.gelu(_kdense(y, p[f"l{i}_fc1"]), approximate=True)
    x = x + _kdense(y, p[f"l{i}_fc2"])
  x = _kln(x, p["ln"], VIT_LN_EPS)
  return _kdense(ops.mean(x, axis=1), p["fc"])


def _k_bert(v, x, cfg):
  from keras import ops
  p = v["params"]
  x = _kln(x, p["emb_ln"], BERT_LN_EPS)
  for i in range(cfg.layers):
    x = _kln(x + _kattn(x, p[f"l{i}_attn"], cfg.heads), p[f"l{i}_ln1"],
             BERT_LN_EPS)
    y = ops.gelu(_kdense(x, p[f"l{i}_fc1"]), approximate=False)
    x = _kln(x + _kdense(y, p[f"l{i}_fc2"]), p[f"l{i}_ln2"], BERT_LN_EPS)
  return x


KERAS = {"mobilenet_v2": _k_mobilenet_v2, "resnet50": _k_resnet50,
         "vit_s16": _k_vit, "bert": _k_bert, "bert_tiny": _k_bert}


def keras_model(name: str, variables: dict):
  import keras
  inp = keras.Input(SPECS[name][1], batch_size=1)
  return keras.Model(inp, KERAS[name](variables, inp, model(name)))
