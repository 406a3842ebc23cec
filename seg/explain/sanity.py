"""Sanity checks of gate maps: do they depend on what the network learned? (Adebayo et al. 2018)

A saliency map that looks the same for a trained and an untrained network explains nothing. For attention gates:
- an untrained (randomly initialised) network's gates look nowhere in particular: concentration close to 1;
- training raises it on at least one level (the gates learn to pass the target's features);
- the model-randomisation test: the trained network with its gate weights drawn afresh (everything else kept)
  loses that concentration again; if it did not, the maps would come from the image, not from the gates.

`gate_concentrations` measures one network on preprocessed volumes; `randomize_gates` makes the control network.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from seg.explain.concentration import attention_concentration
from seg.inference.window import WindowInference
from seg.models.blocks import AttentionGate

__all__ = ["gate_concentrations", "randomize_gates"]


def randomize_gates(network: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of `network` whose attention gates' weights are drawn afresh (PyTorch's default initialisation);
    every other weight is kept. The original is not changed."""
    control = copy.deepcopy(network)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        gates = [m for m in control.modules() if isinstance(m, AttentionGate)]
        if not gates:
            raise ValueError("the network has no attention gates to randomise")
        for gate in gates:
            for layer in gate.modules():
                if layer is not gate and hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)
    return control


@torch.no_grad()
def gate_concentrations(network: nn.Module, volumes: Iterable[tuple[torch.Tensor, np.ndarray]],
                        spacing: Sequence[float], roi_size: Sequence[int], num_classes: int, spatial_dims: int = 3,
                        dilation_mm: float = 2.0, sw_batch_size: int = 4) -> dict[str, float]:
    """Mean attention concentration per gate level over `volumes`, on the network's own (preprocessed) grid.

    Args:
        network: an `AttentionUNet` with gates (`forward_with_gates`).
        volumes: pairs of a preprocessed image `(C, *S)` and its label map `(*S)` (nonzero = target).
        spacing: voxel size in mm of that grid, for the target's dilation.
        roi_size, num_classes, spatial_dims, sw_batch_size: the sliding window, as at validation.
        dilation_mm: as `attention_concentration`.

    Returns:
        {"gate_0": c0, ...} (coarsest level first), each the mean over the volumes where it is defined (NaN: none).
    """
    was_training = network.training
    network.eval()
    engine = WindowInference(network, roi_size, num_classes, spatial_dims, sw_batch_size=sw_batch_size)
    values: dict[str, list[float]] = {}
    try:
        for image, label in volumes:
            maps = engine.predict(image[None].float(), gates=True)
            for key, value in maps.items():
                if key.startswith("gate_"):
                    c = attention_concentration(value[0, 0].cpu().numpy(), np.asarray(label), spacing, dilation_mm)
                    values.setdefault(key, [])
                    if not math.isnan(c):
                        values[key].append(c)
    finally:
        network.train(was_training)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in sorted(values.items())}
