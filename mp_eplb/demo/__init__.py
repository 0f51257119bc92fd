"""The demo MoE engine: a small expert-parallel model decoding step by step with a balancer.

``mp-eplb demo`` runs it (:func:`mp_eplb.demo.launch.run_demo`); the model lives in
:mod:`mp_eplb.demo.model`, the step loop and the balancer protocol in :mod:`mp_eplb.demo.engine`.
"""

from __future__ import annotations

from mp_eplb.demo.engine import Balancer, BalancerReport, StaticBalancer, StepReport, run_engine
from mp_eplb.demo.graph import GraphMoEModel, GraphOptions
from mp_eplb.demo.launch import add_demo_arguments, make_balancer, run_demo, run_ranks
from mp_eplb.demo.model import MoEConfig, MoEModel, VerificationError, verify_weights

__all__ = [
    "Balancer",
    "BalancerReport",
    "GraphMoEModel",
    "GraphOptions",
    "MoEConfig",
    "MoEModel",
    "StaticBalancer",
    "StepReport",
    "VerificationError",
    "add_demo_arguments",
    "make_balancer",
    "run_demo",
    "run_engine",
    "run_ranks",
    "verify_weights",
]
