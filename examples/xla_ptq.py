"""XLA post-training quantization of a transformer block: weight-only, DRQ
and SRQ side by side; weights quantized layer by layer from an orbax
checkpoint, saved and restored; speed and SQNR against float32.

    python examples/xla_ptq.py [--reps 20]

1. A pre-LN transformer block (d 384, 6 heads, MLP 1536) is initialised and
   its float params saved as an orbax checkpoint (as training would).
2. The quantized weights are built without ever holding the whole float
   tree: ``abstract_quantized_params`` traces the model on shapes only
   (``jax.eval_shape``), then each layer's float params are restored alone
   from the checkpoint and quantized with ``quantize_params``.
3. ``save_qparams`` / ``restore_qparams`` round-trip them through orbax.
4. ``quantize_model(model, PtqProvider(rules, stats))`` runs w8 weight-only,
   w8a8 dynamic-range (DRQ) and w8a8 static-range (SRQ, the stats from
   ``qlite.calibrate``, the same object the LiteRT export uses) on XLA;
   prints SQNR vs float32, parameter bytes and latency vs jitted float32.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

import qlite
from qlite import xla


class Block(nn.Module):
  """Pre-LN transformer block: multi-head attention + GELU MLP."""
  d: int = 384
  heads: int = 6
  mlp: int = 1536

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    hd = self.d // self.heads
    y = nn.LayerNorm(name="ln1")(x)
    q, k, v = (nn.Dense(self.d, name=n)(y).reshape(b, t, self.heads, hd)
               for n in ("query", "key", "value"))
    a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd))
    y = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, self.d)
    x = x + nn.Dense(self.d, name="out")(y)
    y = nn.gelu(nn.Dense(self.mlp, name="mlp_in")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(self.d, name="mlp_out")(y)


def median_ms(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))            # compile / pack once
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times) * 1e3)


def _abstract(tree):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                     sharding=dev), tree)


def main(reps: int = 20, workdir: str | None = None) -> dict:
  workdir = workdir or tempfile.mkdtemp()
  model = Block()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 16, model.d)).astype(np.float32)
  calib = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(4)]

  # 1. A float checkpoint, as training leaves it.
  ckpt = os.path.join(workdir, "float_ckpt")
  with ocp.StandardCheckpointer() as c:
    c.save(ckpt, model.init(jax.random.key(0), x))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  srq = [qlite.QuantizationRule(module_path=".*", weight_qtype="int8",
                                act_qtype="int8", act_static_scale=True)]
  # 2. Layer by layer: restore one layer's float params, quantize them.
  abstract = xla.abstract_quantized_params(model, srq, x, variables=shapes)
  qparams = {"params": {}}
  print("quantize_params layer by layer from the checkpoint:")
  with ocp.PyTreeCheckpointer() as c:
    for name, sub_abstract in abstract["params"].items():
      item = {"params": {name: _abstract(shapes["params"][name])}}
      fp = c.restore(ckpt, args=ocp.args.PyTreeRestore(
          item=item, partial_restore=True))["params"][name]
      qparams["params"][name] = xla.quantize_params(fp, sub_abstract)
      kinds = ", ".join(
          f"{k} {v.qtype.name}{list(v.shape)}" if hasattr(v, "qtype")
          else f"{k} f32{list(v.shape)}"
          for k, v in qparams["params"][name].items())
      print(f"  {name:8s} {xla.param_bytes(fp):>9,} B -> "
            f"{xla.param_bytes(qparams['params'][name]):>9,} B  ({kinds})")
      del fp                                   # one float layer at a time

  # 3. orbax round trip of the quantized params.
  qckpt = os.path.join(workdir, "int8_ckpt")
  xla.save_qparams(qckpt, qparams)
  restored = xla.restore_qparams(qckpt, abstract)
  same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(qparams), jax.tree.leaves(restored)))
  print(f"save_qparams / restore_qparams: {qckpt}, identical: {same}")

  # 4. Run the variants on XLA against float32.
  with ocp.StandardCheckpointer() as c:
    variables = c.restore(ckpt, _abstract(shapes))
  f32 = jax.jit(model.apply)
  ref = np.asarray(f32(variables, x))
  stats = qlite.calibrate(model, srq, calib, variables=variables,
                          progress=False)
  variants = {
      "w8 weight-only": ([qlite.QuantizationRule(
          module_path=".*", weight_qtype="int8", act_qtype=None)], None),
      "w8a8 DRQ": ([qlite.QuantizationRule(
          module_path=".*", weight_qtype="int8", act_qtype="int8",
          act_static_scale=False)], None),
      "w8a8 SRQ": (srq, stats),
  }
  t_f32 = median_ms(f32, (variables, x), reps)
  n_f32 = xla.param_bytes(variables)
  print(f"\ntransformer block d{model.d}, input {x.shape}, median of "
        f"{reps} calls on {jax.devices()[0].platform}:")
  head = f"{'variant':16s} {'SQNR dB':>8s} {'params B':>11s} {'ms':>8s} " \
         f"{'speed':>7s}"
  print(head)
  print("-" * len(head))
  print(f"{'float32':16s} {'-':>8s} {n_f32:>11,} {t_f32:8.2f} "
        f"{1.0:6.2f}x")
  res = {"f32_ms": t_f32, "restored_identical": same}
  for label, (rules, st) in variants.items():
    qm = xla.quantize_model(model, xla.PtqProvider(rules, st),
                            variables=variables)
    params = restored if label == "w8a8 SRQ" else xla.quantize_params(
        variables, xla.abstract_quantized_params(model, rules, x,
                                                 variables=shapes))
    y = np.asarray(qm.apply(params, x))
    ms = median_ms(qm.apply, (params, x), reps)
    sq = qlite.metrics.sqnr_db(ref, y)
    nb = xla.param_bytes(params)
    res[label] = {"sqnr_db": sq, "ms": ms, "bytes": nb}
    print(f"{label:16s} {sq:8.1f} {nb:>11,} {ms:8.2f} {t_f32 / ms:6.2f}x")
  return res


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=20)
  warnings.filterwarnings("ignore", message=".*[Ss]harding.*")
  main(p.parse_args().reps)
