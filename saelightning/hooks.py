"""Hook-point names (TransformerLens style) and their parsing.

A hook point names one activation inside the nanochat stack:
  blocks.{i}.hook_resid_pre   residual stream entering block i (after the current era's lambda mix)
  blocks.{i}.hook_resid_mid   residual stream after block i's attention, before its MLP
  blocks.{i}.hook_resid_post  residual stream leaving block i (the output of transformer.h[i])
  blocks.{i}.hook_attn_out    block i's attention output (what is added to the stream)
  blocks.{i}.hook_mlp_in      block i's MLP input: the RMS-normed hook_resid_mid the MLP reads (what a
                              transcoder reads)
  blocks.{i}.hook_mlp_out     block i's MLP output (what is added to the stream; what a transcoder writes)
  blocks.{i}.mlp.hook_post    block i's MLP hidden activation, relu(x)^2, width 4*d_model
"""

from __future__ import annotations

import re

from saelightning.errors import SAELightningError

HOOK_KINDS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_post",
    "hook_mlp_in",
)
# the order a block computes them in (a transcoder's output hook must come after its input hook)
FORWARD_ORDER = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "mlp.hook_post",
                 "hook_mlp_out", "hook_resid_post")
_PATTERN = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + r")$")


def hook_names(n_layer: int) -> list[str]:
    """Every valid hook-point name for a model with n_layer blocks, in forward order."""
    return [f"blocks.{i}.{kind}" for i in range(n_layer) for kind in HOOK_KINDS]


def parse_hook(name: str, n_layer: int) -> tuple[int, str]:
    """Split a hook-point name into (layer, kind); a one-line error lists the valid names otherwise."""
    m = _PATTERN.match(name)
    valid = f"blocks.{{0..{n_layer - 1}}}.{{{','.join(HOOK_KINDS)}}}"
    if m is None:
        raise SAELightningError(f"unknown hook point {name!r}: valid names are {valid}")
    layer = int(m.group(1))
    if layer >= n_layer:
        raise SAELightningError(
            f"hook point {name!r} is out of range: the model has {n_layer} layers, "
            f"so valid names are {valid}"
        )
    return layer, m.group(2)


def hook_width(name: str, n_layer: int, d_model: int) -> int:
    """The activation width at a hook point: d_model, or 4*d_model for the MLP hidden layer."""
    _, kind = parse_hook(name, n_layer)
    return 4 * d_model if kind == "mlp.hook_post" else d_model


def forward_position(name: str, n_layer: int) -> tuple[int, int]:
    """(layer, rank within the block) of a hook point: which of two hooks the forward reaches first."""
    layer, kind = parse_hook(name, n_layer)
    return layer, FORWARD_ORDER.index(kind)


def deepest_layer(names, n_layer: int) -> int:
    """The index of the last block a forward must run to produce every named activation."""
    return max(parse_hook(n, n_layer)[0] for n in names)
