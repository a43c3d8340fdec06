"""Training objectives, apart from the networks they train: rectified flow (continuous latents) and masked
VQ-token prediction (discrete latents). ``OBJECTIVES`` maps a latent kind to its objective."""

from __future__ import annotations

from .base import Objective
from .flow import TIMESTEP_SCHEDULES, RectifiedFlow
from .masked import MASK_RATIOS, MaskedTokens

OBJECTIVES: dict[str, type[Objective]] = {cls.latent_kind: cls for cls in (RectifiedFlow, MaskedTokens)}

__all__ = ["MASK_RATIOS", "OBJECTIVES", "TIMESTEP_SCHEDULES", "MaskedTokens", "Objective", "RectifiedFlow"]
