"""Plan layer: how a call is computed (bound check, certificate, cost, backend choice)."""

from .bounds import InputStats, input_stats, threshold
from .certificate import Certificate, choose_certificate
from .planner import BoundWarning, Plan, make_plan, plan

__all__ = [
    "BoundWarning",
    "Certificate",
    "InputStats",
    "Plan",
    "choose_certificate",
    "input_stats",
    "make_plan",
    "plan",
    "threshold",
]
