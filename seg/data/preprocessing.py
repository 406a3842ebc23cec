"""The preprocessing settings a model is trained with: which normalisation each channel gets.

Plain Python (no MONAI, no torch), so `seg plan` can decide them without loading the transform library.
"""

from __future__ import annotations

from collections.abc import Sequence


def channel_schemes(modalities: Sequence[str], normalization: str = "auto") -> list[str]:
    """Normalisation scheme per channel: "auto" gives CT channels "ct" and every other modality "zscore"."""
    if normalization not in ("auto", "zscore", "ct"):
        raise ValueError(f"normalization must be 'auto', 'zscore' or 'ct', got '{normalization}'")
    if normalization != "auto":
        return [normalization] * len(modalities)
    return ["ct" if m.strip().upper() == "CT" else "zscore" for m in modalities]
