"""Training planner: `python -m vitscale.plan +experiment=vit_h14_jft plan.gpu=h100-80gb plan.gpus=256`.

Imports vitscale.engine (its config helpers); the engine never imports this package.
"""
from vitscale.plan.memory import ModelStates, activation_bytes, model_states, model_states_for_cfg
from vitscale.plan.planner import make_plan, plan_summary

__all__ = ["ModelStates", "activation_bytes", "make_plan", "model_states", "model_states_for_cfg", "plan_summary"]
