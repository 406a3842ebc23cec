"""Where the network looks: attention concentration, the overlay figure, gate-map export and `seg overlays`.

Nothing here needs Lightning; the training callback `GateOverlays` uses it.
"""

from seg._exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "attention_concentration": "seg.explain.concentration",
    "export_case": "seg.explain.export",
    "render_overlay": "seg.figure",
})
