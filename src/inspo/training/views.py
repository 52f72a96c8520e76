"""Which view each model is scored on, and so which views a training batch carries.

The view decides standard vs InSPO: ``plain`` scores y after x, ``reflective`` scores y after
R(x, y'). The objective never knows which one it got.
"""

from __future__ import annotations

from inspo.names import PLAIN, REFLECTIVE, VIEWS, Reflection


def policy_view(reflection: Reflection | str) -> str:
    """The view the policy is scored on: plain (standard form) or reflective (InSPO)."""
    return PLAIN if reflection == Reflection.off else REFLECTIVE


def reference_view(reflection: Reflection | str, reference_context: str) -> str:
    """The view the reference is scored on."""
    if reflection == Reflection.inspo_one_sided:
        return PLAIN  # eq. 22 of the InSPO paper compares against S_ref(y_l | x)
    return policy_view(reflection) if reference_context == REFLECTIVE else PLAIN


def train_views(
    reflection: Reflection | str,
    requires_reference: bool,
    reference_context: str = REFLECTIVE,
    standard_weight: float = 0.0,
    distill_weight: float = 0.0,
) -> tuple[str, ...]:
    """The views a training batch must carry; the data module builds exactly these."""
    views = {policy_view(reflection)}
    if requires_reference:
        views.add(reference_view(reflection, reference_context))
    if reflection != Reflection.off and (standard_weight > 0 or distill_weight > 0):
        views.add(PLAIN)  # the standard loss and the distillation student see x alone
    return tuple(v for v in VIEWS if v in views)
