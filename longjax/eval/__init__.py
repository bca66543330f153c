"""Evaluation: tasks on trained models, their JSON results and plots."""

from longjax.eval.harness import EVAL_TASKS, EvalContext, evaluate

__all__ = ["EVAL_TASKS", "EvalContext", "evaluate"]
