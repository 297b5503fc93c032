"""Helpers shared by the rules for layers with weights: channel vectors and parameter lookup.

A layer input's atoms as one vector along its channel dim, the parameter behind a ``get_attr``
argument, and the tensor a parameter name refers to.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch.nn.utils import parametrize

from fxprune.errors import UnsupportedModelError
from fxprune.graph.depgraph import NONE, Analysis


def channel_vec(ctx: Analysis, node: fx.Node, X: np.ndarray, d: int, n: int) -> np.ndarray:
    """Atoms along dim ``d`` as a vector of length ``n``; atoms on other dims are blocked."""
    others = [k for k in range(X.ndim) if k != d and X.shape[k] > 1]
    if others:
        ctx.block(X, node, "channels spread over more than one dim of a layer input")
        return np.full(n, NONE, dtype=np.int64)
    if X.shape[d] == 1:
        return (
            np.full(n, int(X.reshape(-1)[0]), dtype=np.int64)
            if n == 1
            else np.full(n, NONE, dtype=np.int64)
        )
    return X.reshape(-1).astype(np.int64)


def with_vec(ndim: int, d: int, vec: np.ndarray) -> np.ndarray:
    shape = [1] * ndim
    shape[d] = vec.size
    return vec.reshape(shape)


def param_name(node: fx.Node, a) -> str | None:
    """Name of the parameter behind a get_attr argument, else None."""
    return a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None


def layer_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def get_tensor(ctx: Analysis, name: str) -> torch.Tensor:
    try:
        return ctx.gm.get_parameter(name)
    except AttributeError:
        pass
    try:
        return ctx.gm.get_buffer(name)
    except AttributeError:
        owner, _, attr = name.rpartition(".")
        mod = ctx.gm.get_submodule(owner) if owner else ctx.gm
        if parametrize.is_parametrized(mod, attr):
            raise UnsupportedModelError(
                f"'{owner}': its {attr} is computed by a parametrization (weight_norm / "
                "spectral_norm) that torch.fx does not look into; use mode='export' (its "
                "channels are kept, the rest prunes) or torch.nn.utils.parametrize."
                "remove_parametrizations first"
            ) from None
        raise
