"""Quantization on a device mesh (qlite/xla/sharding.py): a transformer
block's params sharded on both axes of a 2 x 4 mesh of 8 simulated CPU
devices. The mesh needs ``--xla_force_host_platform_device_count=8`` before
jax starts, so :func:`test_on_8_simulated_devices` runs this file's
``test_inner_*`` tests in a separate pytest process with that flag."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.environ.get("QLITE_SHARDING_WORKER") == "1"
inner = pytest.mark.skipif(
    not WORKER, reason="runs in the 8-device subprocess of "
    "test_on_8_simulated_devices")


def _worker(marker: str) -> str:
  env = dict(os.environ, QLITE_SHARDING_WORKER="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  r = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "-m", marker, __file__, "-k", "inner"],
      env=env, capture_output=True, text=True, timeout=900,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = r.stdout[-6000:] + r.stderr[-3000:]
  assert r.returncode == 0, out
  return r.stdout


def _passed(stdout: str) -> int:
  m = re.search(r"(\d+) passed", stdout)
  assert m and "skipped" not in stdout.strip().splitlines()[-1], stdout
  return int(m.group(1))


def test_on_8_simulated_devices():
  if WORKER:
    pytest.skip("the worker itself")
  assert _passed(_worker("not slow")) == N_INNER


@pytest.mark.slow
def test_on_8_simulated_devices_slow():
  if WORKER:
    pytest.skip("the worker itself")
  assert _passed(_worker("slow")) == N_INNER_SLOW


# test_inner_* cases below (parametrized ones counted), default / slow
N_INNER, N_INNER_SLOW = 8, 3

if WORKER:
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P

  import qlite
  from qlite import xla
  from qlite.core import QArray
  from qlite.core.qarray import is_qarray
  from qlite.errors import QliteError
  from qlite.xla import sharding as qs

  class Block(nn.Module):
    d: int = 64
    heads: int = 4
    ff: int = 128

    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm()(x)
      h = nn.MultiHeadDotProductAttention(num_heads=self.heads,
                                          qkv_features=self.d)(h, h)
      x = x + h
      h = nn.gelu(nn.Dense(self.ff)(nn.LayerNorm()(x)))
      return x + nn.Dense(self.d)(h)

  # Both mesh axes shard weights: "model" the heads / hidden units (tensor
  # parallel), "data" the other weight axis (FSDP) and the batch.
  RULES = [
      (r"(query|key|value)/kernel$", P("data", "model")),
      (r"(query|key|value)/bias$", P("model")),
      (r"out/kernel$", P("model", None, "data")),
      (r"Dense_0/kernel$", P("data", "model")),
      (r"Dense_0/bias$", P("model")),
      (r"Dense_1/kernel$", P("model", "data")),
  ]

  def qrules(w="int8", a=None, static=True, tile=None):
    return [qlite.QuantizationRule(module_path=".*", weight_qtype=w,
                                   act_qtype=a, act_static_scale=static,
                                   weight_tile_size=tile)]

  MODES = {"w8": {}, "w8a8_drq": dict(a="int8", static=False),
           "w4_tiles": dict(w="int4", tile=32),
           "w8a8_srq": dict(a="int8")}
  SLOW_MODES = {"w8", "w8a8_srq"}

  @pytest.fixture(scope="module")
  def setup():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "model"))   # Explicit axes
    model = Block()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 64)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    return mesh, model, variables, x

  def _spec(a):
    return tuple(a.sharding.spec) + (None,) * (
        a.ndim - len(a.sharding.spec))

  def _qleaves(tree):
    return [(jax.tree_util.keystr(p), l) for p, l in
            jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qarray)
            if is_qarray(l)]

  @inner
  def test_inner_quantize_params_keeps_the_mesh_layout(setup):
    mesh, model, variables, x = setup
    rules = qrules(**MODES["w4_tiles"])
    abstract = xla.abstract_quantized_params(model, rules, x,
                                             variables=variables)
    sharded = qs.shard_params(variables, mesh, RULES)
    q_sh = xla.quantize_params(sharded, abstract)
    q_one = xla.quantize_params(variables, abstract)
    leaves = dict(_qleaves(q_sh))
    assert len(leaves) == 6          # q, k, v, out, Dense_0, Dense_1
    for (name, a), (_, b) in zip(_qleaves(q_sh), _qleaves(q_one)):
      np.testing.assert_array_equal(np.asarray(a.qvalue, np.int8),
                                    np.asarray(b.qvalue, np.int8))
      np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
      assert isinstance(a.qvalue.sharding, NamedSharding), name
    q = leaves["['params']['MultiHeadDotProductAttention_0']['query']"
               "['kernel']"]
    # [D=64, H=4, Dh=16], K tiles of 32: the scale [2, 4, 16] keeps both
    # mesh axes (2 tiles over "data", heads over "model")
    assert _spec(q.qvalue) == ("data", "model", None)
    assert q.scale.shape == (2, 4, 16)
    assert _spec(q.scale) == ("data", "model", None)
    d1 = leaves["['params']['Dense_1']['kernel']"]      # [128, 64]
    assert _spec(d1.qvalue) == ("model", "data")
    assert d1.scale.shape == (4, 64)                     # 4 tiles over K
    assert _spec(d1.scale) == ("model", "data")
    out = leaves["['params']['MultiHeadDotProductAttention_0']['out']"
                 "['kernel']"]                           # [H, Dh, D]
    assert _spec(out.qvalue) == ("model", None, "data")
    # per output channel: contracted H, Dh reduced (tiles only along one K)
    assert out.scale.shape == (1, 1, 64)
    assert _spec(out.scale) == (None, None, "data")

  @inner
  def test_inner_per_channel_scale_sharded_like_the_output_axis(setup):
    mesh, model, variables, x = setup
    rules = qrules()
    abstract = xla.abstract_quantized_params(model, rules, x,
                                             variables=variables)
    q = xla.quantize_params(qs.shard_params(variables, mesh, RULES),
                            abstract)
    d0 = q["params"]["Dense_0"]["kernel"]                # [64, 128]
    assert d0.scale.shape == (1, 128)
    assert _spec(d0.scale) == (None, "model")
    assert len(d0.scale.sharding.device_set) == 8
    # each device holds 128 / 4 scales of its 32 output channels
    shard = d0.scale.addressable_shards[0]
    assert shard.data.shape == (1, 32)

  @inner
  @pytest.mark.parametrize("mode", [
      pytest.param(m, marks=pytest.mark.slow) if m in SLOW_MODES else m
      for m in MODES])
  def test_inner_outputs_equal_the_unsharded_model(setup, mode):
    mesh, model, variables, x = setup
    rules = qrules(**MODES[mode])
    stats = None
    if mode == "w8a8_srq":
      stats = qlite.calibrate(model, rules, [x, 0.5 * x],
                              variables=variables, progress=False,
                              engine="xla")
    abstract = xla.abstract_quantized_params(model, rules, x,
                                             variables=variables)
    qm = xla.quantize_model(model, xla.PtqProvider(rules, stats),
                            variables=variables)
    ref = np.asarray(qm.apply(xla.quantize_params(variables, abstract), x))
    qm2 = xla.quantize_model(model, xla.PtqProvider(rules, stats),
                             variables=variables)
    sharded = qs.shard_params(variables, mesh, RULES)
    xs = qs.shard_batch(x, mesh, "data")
    y = qm2.apply(xla.quantize_params(sharded, abstract), xs)
    assert isinstance(y.sharding, NamedSharding)
    y = np.asarray(y)
    scale = np.abs(ref).max()
    # int32 sums are exact in any order, but LayerNorm / softmax reductions
    # over sharded axes round differently in the last bit. With int8
    # activations that is all (measured 1e-7 of the range DRQ, 0 SRQ);
    # weight-only dots quantize each activation row to ~16 bits, where a
    # last-bit change moves a code: up to ~3e-5 of the range (2e-5 measured).
    tol = 1e-6 if MODES[mode].get("a") else 5e-5
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol * scale)
    # float params sharded: the provider quantizes them on the fly, keeping
    # the layout, with the same outputs
    y2 = np.asarray(qm2.apply(sharded, xs))
    np.testing.assert_allclose(y2, ref, rtol=0, atol=tol * scale)
    graph, state = qm2.traced((xs,))
    flat = qm2.provider.quantize_flat_params(
        state, jax.tree.leaves(sharded, is_leaf=is_qarray))
    qa = [p for p in flat if isinstance(p, QArray)]
    assert len(qa) == 6 and all(
        isinstance(p.scale.sharding, NamedSharding) and
        len(p.scale.sharding.device_set) == 8 for p in qa)

  def _compare_stats(one, dp, exact_minmax):
    assert sorted(one.keys()) == sorted(dp.keys()) and len(one.keys()) > 5
    for key in one.keys():
      a, b = one[key], dp[key]
      assert sorted(a) == sorted(b), key
      for stat in a:
        va, vb = np.asarray(a[stat]), np.asarray(b[stat])
        if va.dtype.kind in "iu" or (exact_minmax and stat in ("min",
                                                               "max")):
          np.testing.assert_array_equal(va, vb, err_msg=f"{key} {stat}")
        else:
          np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-6,
                                     err_msg=f"{key} {stat}")

  @inner
  def test_inner_data_parallel_calibration_same_stats(setup):
    """Batches split over the "data" axis, params replicated: every row's
    activations are what one device computes, so min / max (and histogram
    counts) are identical; sums differ only in float summation order."""
    mesh, model, variables, x = setup
    rules = qrules(a="int8")
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(x.shape).astype(np.float32)
               for _ in range(2)]
    one = qlite.calibrate(model, rules, batches, variables=variables,
                          progress=False, engine="xla", method="mse")
    dp = qlite.calibrate(model, rules,
                         [qs.shard_batch(b, mesh, "data") for b in batches],
                         variables=qs.shard_params(variables, mesh, []),
                         progress=False, engine="xla", method="mse")
    assert isinstance(qs.shard_batch(batches[0], mesh).sharding,
                      NamedSharding)
    _compare_stats(one, dp, exact_minmax=True)

  @inner
  @pytest.mark.slow
  def test_inner_calibration_with_sharded_params(setup):
    """Params sharded on both axes too: the dots sum K in another order, so
    every statistic matches to float rounding."""
    mesh, model, variables, x = setup
    rules = qrules(a="int8")
    one = qlite.calibrate(model, rules, [x], variables=variables,
                          progress=False, engine="xla")
    sh = qlite.calibrate(model, rules, [qs.shard_batch(x, mesh, "data")],
                         variables=qs.shard_params(variables, mesh, RULES),
                         progress=False, engine="xla")
    _compare_stats(one, sh, exact_minmax=False)

  @inner
  def test_inner_orbax_round_trip_of_sharded_qarrays(setup, tmp_path):
    mesh, model, variables, x = setup
    rules = qrules(**MODES["w4_tiles"])
    abstract = xla.abstract_quantized_params(model, rules, x,
                                             variables=variables)
    q = xla.quantize_params(qs.shard_params(variables, mesh, RULES),
                            abstract)
    path = str(tmp_path / "ckpt")
    xla.save_qparams(path, q)
    target = qs.shard_params(abstract, mesh, RULES)
    back = xla.restore_qparams(path, target)
    pairs = list(zip(jax.tree.leaves(q, is_leaf=is_qarray),
                     jax.tree.leaves(back, is_leaf=is_qarray)))
    assert len(pairs) == len(jax.tree.leaves(variables))
    for a, b in pairs:
      arrays = [(a.qvalue, b.qvalue), (a.scale, b.scale)] if \
          is_qarray(a) else [(a, b)]
      if is_qarray(a):
        assert b.qvalue.dtype == a.qvalue.dtype
      for u, v in arrays:
        assert v.sharding == u.sharding, (v.sharding, u.sharding)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(u))

  @inner
  def test_inner_pallas_on_weights_sharded_along_n(setup, monkeypatch):
    """Interpret mode: a weight sharded along its output channels runs the
    kernel per device under shard_map (identical DRQ outputs, N stays
    sharded); sharded along K it stays on XLA's SPMD path."""
    mesh = setup[0]
    from qlite.xla import pallas as pallas_lib

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(512)(nn.relu(nn.Dense(512)(x)))

    model = MLP()
    x = np.random.default_rng(3).standard_normal((8, 256)).astype(
        np.float32)
    variables = model.init(jax.random.key(1), x)
    rules = qrules(a="int8", static=False)
    monkeypatch.setenv("QLITE_PALLAS", "off")
    ref = np.asarray(xla.quantize_model(model, xla.PtqProvider(rules),
                                        variables=variables).apply(
                                            variables, x))
    monkeypatch.setenv("QLITE_PALLAS", "interpret")
    for layout, n_pallas in [([(r"kernel$", P(None, "model"))], 2),
                             ([(r"kernel$", P("data", None))], 0)]:
      sharded = qs.shard_params(variables, mesh, layout)
      qm = xla.quantize_model(model, xla.PtqProvider(rules),
                              variables=variables)
      graph, state = qm.traced((x,))
      flat = qm.provider.prepare_flat_params(
          graph, state, jax.tree.leaves(sharded))
      pws = [p for p in flat if isinstance(p, pallas_lib.PallasWeight)]
      assert len(pws) == n_pallas, layout
      for pw in pws:
        assert pw.plan.axis == "model" and pw.plan.block_n == 128
        assert tuple(pw.data.sharding.spec) == (None, "model")
        assert tuple(pw.wscale.sharding.spec) == (None, "model")
      y = qm.apply(sharded, x)
      np.testing.assert_array_equal(np.asarray(y), ref)
      if n_pallas:
        assert tuple(y.sharding.spec)[-1:] == ("model",)

  @inner
  def test_inner_bad_layouts_are_named(setup):
    mesh = setup[0]
    tree = {"layer": {"w": np.zeros((6, 4), np.float32),
                      "b": np.zeros((4,), np.float32)}}
    with pytest.raises(QliteError, match=r"layer/w has shape \(6, 4\): "
                       r"mesh axis 'model' \(4 devices\) does not divide 6"):
      qs.shard_params(tree, mesh, [(r"w$", P("model"))])
    with pytest.raises(QliteError, match=r"layer/b: PartitionSpec.*rank 1"):
      qs.shard_params(tree, mesh, [(r"b$", P("data", "model"))])
    with pytest.raises(QliteError, match=r"\(3, 64\).*'data' \(2 devices\)"):
      qs.shard_batch(np.zeros((3, 64), np.float32), mesh, "data")
    ok = qs.shard_params(tree, mesh, [(r"w$", P("data", "model"))])
    assert _spec(ok["layer"]["w"]) == ("data", "model")
    assert ok["layer"]["b"].sharding.is_fully_replicated


# -- several hosts: two processes x 4 CPU devices through jax.distributed ----
def _multihost_worker(pid: int, port: int, ckpt: str) -> None:
  """One of two processes: a 2 x 4 mesh over both processes' devices,
  params built as global arrays from process-local data, quantized,
  run, saved and restored; prints lines the parent test checks."""
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=2, process_id=pid)
  from flax import linen as nn
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  import qlite
  from qlite import xla
  from qlite.xla import sharding as qs

  class MLPBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.gelu(nn.Dense(128)(nn.LayerNorm()(x)))
      return x + nn.Dense(64)(h)

  model = MLPBlock()
  x = np.random.default_rng(0).standard_normal((8, 16, 64)).astype(
      np.float32)
  variables = model.init(jax.random.key(0), x)   # the same in each process
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  am = qs.auto_mesh(mesh)
  layout = [(r"Dense_0/kernel$", P("data", "model")),
            (r"Dense_1/kernel$", P("model", "data"))]
  specs = qs.param_path_specs(variables, layout)

  def global_array(path, a):
    s = NamedSharding(am, specs[qs._path_str(path)])
    return jax.make_array_from_callback(a.shape, s,
                                        lambda idx: np.asarray(a)[idx])

  params = jax.tree_util.tree_map_with_path(global_array, variables)
  rules = [qlite.QuantizationRule(act_static_scale=False)]
  abstract = xla.abstract_quantized_params(model, rules, x,
                                           variables=variables)
  qparams = xla.quantize_params(params, abstract)
  k = qparams["params"]["Dense_0"]["kernel"]
  print(f"scale {k.scale.sharding.spec} local={k.scale.is_fully_addressable}")
  qm = xla.quantize_model(model, xla.PtqProvider(rules),
                          variables=variables)
  xg = jax.make_array_from_process_local_data(
      NamedSharding(am, P("data")), x[pid * 4:(pid + 1) * 4])
  y = multihost_utils.process_allgather(qm.apply(qparams, xg), tiled=True)
  ref = np.asarray(qm.apply(xla.quantize_params(variables, abstract), x))
  print(f"max_diff {float(np.abs(np.asarray(y) - ref).max())}")
  xla.save_qparams(ckpt, qparams)
  back = xla.restore_qparams(ckpt, qs.shard_params(abstract, mesh, layout))
  b = back["params"]["Dense_0"]["kernel"]
  same = all(np.array_equal(
      np.asarray(multihost_utils.process_allgather(u, tiled=True)),
      np.asarray(multihost_utils.process_allgather(v, tiled=True)))
             for u, v in [(b.qvalue, k.qvalue), (b.scale, k.scale)])
  print(f"restored {b.qvalue.sharding.spec} {b.scale.sharding.spec} "
        f"equal={same}")


@pytest.mark.slow
def test_two_processes_through_jax_distributed(tmp_path):
  """docs/xla_accelerators.md's multi-host recipe, as two local processes
  (4 CPU devices each, gloo collectives)."""
  if WORKER:
    pytest.skip("the worker itself")
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "QLITE_SHARDING_WORKER")}
  ckpt = str(tmp_path / "ckpt")
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--multihost", str(pid),
       str(port), ckpt], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
    assert "scale P(None, 'model') local=False" in out, out
    assert "max_diff 0.0" in out, out        # DRQ: identical outputs
    assert ("restored P('data', 'model') "
            "P(None, 'model') equal=True") in out, out


if __name__ == "__main__" and sys.argv[1:2] == ["--multihost"]:
  _multihost_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
