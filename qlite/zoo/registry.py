"""The model zoo registry: ``ZOO`` maps ``"<family>/<linen|nnx>"`` names to
zero-argument builders of ``ZooModel``; ``get(name)`` builds one."""

from __future__ import annotations

from typing import Callable

from qlite.errors import QliteError
from qlite.zoo import (autoencoder, causal_lm, diffusion_unet, digits_cnn,
                       graph_net, mlp_mixer, mobilenet_v2, moe, resnet,
                       rnn_classifier, squeeze_excite, tcn, transformer, unet)
from qlite.zoo.base import ZooModel

__all__ = ["ZOO", "ZooModel", "FAMILIES", "get", "names"]

_MODULES = {
    "digits_cnn": digits_cnn,
    "mobilenet_v2": mobilenet_v2,
    "resnet": resnet,
    "transformer": transformer,
    "unet": unet,
    "tcn": tcn,
    "squeeze_excite": squeeze_excite,
    "mlp_mixer": mlp_mixer,
    # issue 15: idioms of public Flax models (appended: earlier names keep
    # their order).
    "causal_lm": causal_lm,
    "rnn_classifier": rnn_classifier,
    "autoencoder": autoencoder,
    "graph_net": graph_net,
    "diffusion_unet": diffusion_unet,
    "moe": moe,
}

FAMILIES: tuple = tuple(_MODULES)

ZOO: dict[str, Callable[[], ZooModel]] = {}
for _family, _module in _MODULES.items():
  ZOO[f"{_family}/linen"] = _module.build_linen
  ZOO[f"{_family}/nnx"] = _module.build_nnx
del _family, _module


def names() -> list:
  """Returns the registry names in registration order."""
  return list(ZOO)


def get(name: str) -> ZooModel:
  """Builds and returns the zoo model registered as ``name``.

  Raises:
    QliteError: ``name`` is not registered (the message lists valid names).
  """
  try:
    builder = ZOO[name]
  except (KeyError, TypeError):
    raise QliteError(f"unknown zoo model {name!r}; valid names: "
                     f"{', '.join(ZOO)}") from None
  return builder()
