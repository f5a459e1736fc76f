"""Planning layer: how a call is computed (bound check, certificate, cost, backend choice).

It imports no backend: backends are reached through ``tensorattn.registry``.
"""

from .bounds import InputStats, OperandMaxima, input_stats, operand_maxima, problem_for, threshold
from .certificate import Certificate, GradientBound, certify_gradients, choose_certificate
from .planner import BoundWarning, Plan, make_plan, plan, plan_for

__all__ = [
    "BoundWarning",
    "Certificate",
    "GradientBound",
    "InputStats",
    "OperandMaxima",
    "Plan",
    "certify_gradients",
    "choose_certificate",
    "input_stats",
    "make_plan",
    "operand_maxima",
    "plan",
    "plan_for",
    "problem_for",
    "threshold",
]
