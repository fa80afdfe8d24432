"""Reversible per-instance patches of a vision encoder's layers, shared by STC-Cacher and ToMe.

A patch replaces each encoder layer's `forward` with an instance attribute that runs the patch's
`_layer_step` when the call carries the patch's state keyword (e.g. ``stc_state=``), and the
original forward otherwise. `detach()` deletes the instance attribute, which restores the class
forward exactly. Per-call state travels as that keyword, never in module attributes.
"""

from __future__ import annotations

import types
from typing import Any, Callable

from torch import nn

SUPPORTED_LAYERS = ("SiglipEncoderLayer", "CLIPEncoderLayer")


def encoder_layers(vision_tower: nn.Module, method: str = "STC") -> nn.ModuleList:
    """The encoder layers of a supported transformers 5.x vision tower, or a TypeError that says why not."""
    layers = getattr(getattr(vision_tower, "encoder", None), "layers", None)
    if layers is None:
        hint = ""
        if hasattr(vision_tower, "vision_tower") or hasattr(getattr(vision_tower, "model", None), "vision_tower"):
            hint = " Pass the vision tower itself, e.g. model.model.vision_tower for LLaVA-OneVision."
        raise TypeError(
            f"{type(vision_tower).__name__} is not a supported vision encoder: expected a transformers 5.x "
            f"SiglipVisionModel or CLIPVisionModel with .encoder.layers.{hint}"
        )
    unsupported = sorted({type(layer).__name__ for layer in layers} - set(SUPPORTED_LAYERS))
    if unsupported or not len(layers):
        raise TypeError(
            f"unsupported encoder layer {', '.join(unsupported) or '(none)'}: {method} supports "
            f"{', '.join(SUPPORTED_LAYERS)} (SigLIP for LLaVA-OneVision/StreamForest, CLIP for Dispider)"
        )
    return layers


def patch_owner(layer: nn.Module) -> Any:
    """Who replaced this layer instance's forward: a LayerPatch, another patch's function, or None."""
    forward = layer.__dict__.get("forward")
    if forward is None:
        return None
    return getattr(forward, "__stc_owner__", forward)


class LayerPatch:
    """Base of a reversible patch of every encoder layer of one vision tower.

    Subclasses set `name` (for messages), `state_kwarg` and `state_type`, and implement
    `_layer_step(layer, idx, hidden_states, state) -> hidden_states`.
    """

    name = "patch"
    state_kwarg = "state"
    state_type: type = object

    def __init__(self, vision_tower: nn.Module):
        self.vision_tower = vision_tower
        self.layers = encoder_layers(vision_tower, self.name)
        self.attached = False
        self._holders = 0  # engines sharing this patch (hold / release)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _attach(self) -> None:
        for idx, layer in enumerate(self.layers):
            owner = patch_owner(layer)
            if owner is not None:
                raise ValueError(f"encoder layer {idx} already has a patched forward ({owner!r}); detach it first")
        for idx, layer in enumerate(self.layers):
            layer.forward = _make_forward(self, layer, idx)
        self.attached = True

    def detach(self) -> None:
        """Restore every layer's original forward. Safe to call twice."""
        for layer in self.layers:
            if patch_owner(layer) is self:
                del layer.forward
        self.attached = False
        self._holders = 0

    def hold(self) -> None:
        """Mark one more user (an engine) of this attached patch; `release()` detaches after the last one."""
        if not self.attached:
            raise RuntimeError(f"{self.name} is not attached")
        self._holders += 1

    def release(self) -> None:
        """Give back one `hold()`; the last release detaches the patch."""
        self._holders = max(0, self._holders - 1)
        if self._holders == 0:
            self.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _layer_step(self, layer: nn.Module, idx: int, hidden_states, state):
        raise NotImplementedError


def _make_forward(patch: LayerPatch, layer: nn.Module, idx: int) -> Callable:
    original = type(layer).forward

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        state = kwargs.pop(patch.state_kwarg, None)
        if state is None:
            return original(self, hidden_states, attention_mask, **kwargs)
        if not isinstance(state, patch.state_type):
            raise TypeError(
                f"{patch.state_kwarg} must be a {patch.state_type.__name__} from new_state() of the attached "
                f"{patch.name}, got {type(state).__name__}"
            )
        if attention_mask is not None:
            raise ValueError(f"{patch.name} does not support an attention mask in the vision encoder")
        return patch._layer_step(self, idx, hidden_states, state)

    forward.__stc_owner__ = patch
    return types.MethodType(forward, layer)
