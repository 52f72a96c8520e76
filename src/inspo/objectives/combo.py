"""Weighted sums of objectives: L = Σ_k w_k·L_k (RPO = DPO + α·NLL)."""

from __future__ import annotations

from inspo.objectives.base import Objective, ObjectiveOutput, PairScores
from inspo.settings import SettingError


class Combo(Objective):
    """A weighted sum of objectives, L = Σ_k w_k·L_k, e.g. RPO = DPO + α·NLL.

    Pang et al., "Iterative Reasoning Preference Optimization", 2024 (RPO); TRL:
    ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, α]``.

    ``terms`` is a list of ``{"objective": ..., "weight": float}``; an objective may be given
    instantiated or as a (Dict)Config with ``_target_``, built here. A Combo config sets
    ``_recursive_: false`` so that Hydra hands the terms over as configs: an objective is a
    dataclass, which OmegaConf would turn back into a config inside the list.
    ``requires_reference``/``pairwise`` are true if any term's is; rewards and ``score`` come
    from the first pairwise term. Each term's metrics are logged as ``"{k}/{name}"`` plus
    ``"{k}/loss"``.
    """

    def __init__(self, terms: list) -> None:
        self.terms: list[tuple[Objective, float]] = []
        for k, term in enumerate(terms):
            obj, weight = term["objective"], float(term.get("weight", 1.0))
            if not isinstance(obj, Objective):
                obj = build_term(obj, f"terms.{k}.objective")
            self.terms.append((obj, weight))
        if not self.terms:
            raise SettingError("terms", "a Combo needs at least one term")
        self.requires_reference = any(o.requires_reference for o, _ in self.terms)
        self.pairwise = any(o.pairwise for o, _ in self.terms)
        lead = next((o for o, _ in self.terms if o.pairwise), self.terms[0][0])
        self.score, self.beta, self.scalarization = lead.score, lead.beta, lead.scalarization
        self._lead = lead

    def state_dict(self) -> dict[str, dict]:
        return {str(k): o.state_dict() for k, (o, _) in enumerate(self.terms) if o.state_dict()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for k, (o, _) in enumerate(self.terms):
            o.load_state_dict(state.get(str(k), {}))

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "all_mean":  # the terms average over the same processes
            for o, _ in getattr(self, "terms", ()):
                o.all_mean = value

    def loss(self, s: PairScores) -> ObjectiveOutput:
        losses, metrics, lead_out = 0.0, {}, None
        for k, (obj, weight) in enumerate(self.terms):
            out = obj(s)
            losses = losses + weight * out.losses
            metrics[f"{k}/loss"] = out.losses.detach()
            metrics.update({f"{k}/{name}": v for name, v in out.metrics.items()})
            if obj is self._lead and lead_out is None:
                lead_out = out
        assert lead_out is not None
        return ObjectiveOutput(losses, lead_out.chosen_rewards, lead_out.rejected_rewards, metrics)

    def __repr__(self) -> str:
        return f"Combo({', '.join(f'{w}*{o!r}' for o, w in self.terms)})"


def build_term(spec: object, key: str) -> Objective:
    """A term's objective from its config; a value it refuses names the term's parameter."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(spec)
    except InstantiationException as e:
        if isinstance(e.__cause__, SettingError):
            raise SettingError(f"{key}.{e.__cause__.key}", e.__cause__.why) from None
        raise
