"""Competition math (MATH, Hendrycks et al.): LaTeX problems whose solutions end in ``\\boxed{}``.

Same env class as ``math`` (envs/math.py) with dataset-only defaults: Hub id
``DigitalLearningGmbH/MATH-lighteval`` (all seven subjects; train 7,500 / test 5,000; columns
problem, solution, level, type). ``EleutherAI/hendrycks_math`` works too with one subject per
``env.data.hub_config`` (algebra, counting_and_probability, geometry, intermediate_algebra,
number_theory, prealgebra, precalculus). The gold answer is the last ``\\boxed{}`` of the
solution; equivalence via math-verify. No package ships MATH: offline, pass ``env.data.path``.
Answer readings are math's (envs/math.py), including the lenient one evaluations report: where
no answer block, ``\\boxed{}`` or cue is found, what math-verify reads in the reply (LaTeX too).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from envs.base import DataConfig
from envs.math import MathConfig, MathEnv
from marl_llm.registry import register_env


def _math_data() -> DataConfig:
    return DataConfig(hub_id="DigitalLearningGmbH/MATH-lighteval", hub_config="default", split="train",
                      eval_split="test", fields={"question": "problem", "answer": "solution"})


@dataclass
class CompetitionMathConfig(MathConfig):
    name: str = "competition_math"
    data: DataConfig = field(default_factory=_math_data)
    source: str = "dataset"
    answer_format: str = "boxed"
    answer_instruction: str = ("End your reply with the final answer in the form <answer>ANSWER</answer>, "
                               "ANSWER in simplest form (LaTeX allowed).")


@register_env("competition_math")
class CompetitionMathEnv(MathEnv):
    Config = CompetitionMathConfig
