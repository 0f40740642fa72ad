"""Exit policies as plain JSON data, so an exported early-exit program carries its decision rule.

Serializable: :class:`~slvit_fast.policies.MaxSoftmax`, :class:`~slvit_fast.policies.Entropy`,
:class:`~slvit_fast.policies.Margin` (their thresholds), :class:`~slvit_fast.policies.Patience` and
:class:`~slvit_fast.policies.ClassThresholds`. A :class:`~slvit_fast.policies.RegressionCriterion`
holds arbitrary Python code and a :class:`~slvit_fast.policies.Deadline` a clock: neither can be
written as data, and asking to is an error that says so.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .. import policies

FORMAT = "slvit_fast.policy/1"


def _thresholds_out(values: Any) -> Any:
    return list(values) if isinstance(values, list) else float(values)


def _table_out(table) -> list[list[float | None]]:
    # JSON has no infinity: inf ("never accept this class here") is written as null
    return [[None if math.isinf(v) else float(v) for v in row] for row in table.tolist()]


def policy_to_dict(policy: policies.Policy) -> dict[str, Any]:
    """``policy`` as JSON-ready data; :func:`policy_from_dict` rebuilds an equal policy."""
    kind = type(policy)
    if kind in (policies.MaxSoftmax, policies.Margin):
        return {"format": FORMAT, "type": kind.__name__, "thresholds": _thresholds_out(policy.thresholds)}
    if kind is policies.Entropy:
        return {"format": FORMAT, "type": "Entropy", "thresholds": _thresholds_out(policy.thresholds),
                "normalized": policy.normalized}
    if kind is policies.Patience:
        return {"format": FORMAT, "type": "Patience", "n": policy.n}
    if kind is policies.ClassThresholds:
        return {"format": FORMAT, "type": "ClassThresholds", "table": _table_out(policy.table)}
    if isinstance(policy, policies.RegressionCriterion):
        raise TypeError("a RegressionCriterion policy holds a Python callable and cannot be exported as JSON; "
                        "export with a threshold policy (MaxSoftmax, Entropy, Margin, Patience, ClassThresholds)")
    if isinstance(policy, policies.Deadline):
        raise TypeError("a Deadline (anytime) policy depends on the wall clock of the running process and cannot "
                        "be exported; export with a threshold policy (MaxSoftmax, Entropy, Margin, Patience, "
                        "ClassThresholds)")
    raise TypeError(f"policy type {kind.__name__} cannot be exported as JSON; supported: MaxSoftmax, Entropy, "
                    "Margin, Patience, ClassThresholds")


def policy_from_dict(data: Mapping[str, Any]) -> policies.Policy:
    """The policy written by :func:`policy_to_dict`."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(f"not an exported slvit_fast policy (expected 'format': {FORMAT!r}): {data!r}"[:300])
    kind = data.get("type")
    if kind in ("MaxSoftmax", "Margin"):
        return getattr(policies, kind)(data["thresholds"])
    if kind == "Entropy":
        return policies.Entropy(data["thresholds"], normalized=bool(data.get("normalized", False)))
    if kind == "Patience":
        return policies.Patience(int(data["n"]))
    if kind == "ClassThresholds":
        return policies.ClassThresholds(data["table"])  # None -> inf
    raise ValueError(f"unknown exported policy type {kind!r}")


__all__ = ["policy_to_dict", "policy_from_dict"]
