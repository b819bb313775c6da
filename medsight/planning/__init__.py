"""Defaults that fit the data: a fingerprint of the data set (fingerprint.py), rules that turn it into a
plan (planner.py — a new rule goes there). Fitting a time budget, which needs the machine, is the
engine's (engine/budget.py)."""

from medsight.planning.fingerprint import Fingerprint, fingerprint
from medsight.planning.planner import (RULES, Decision, Plan, adopt_cache, apply_plan, make_plan, plan_for,
                                       plan_preprocessing)

__all__ = ["Fingerprint", "fingerprint", "Plan", "Decision", "make_plan", "apply_plan", "plan_for", "RULES",
           "adopt_cache", "plan_preprocessing"]
