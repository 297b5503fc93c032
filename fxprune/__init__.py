"""fxprune: structural pruning on the traced graph, with proof and honest numbers.

>>> import fxprune
>>> result = fxprune.compile(model, example_inputs, channels=0.5)
>>> fxprune.verify.equivalence(model, result, example_inputs).ok
>>> print(fxprune.estimate(model, example_inputs, sparsity=0.9).table())
>>> torch.compile(model, backend=fxprune.backend(result.plan))  # prune inside torch.compile
"""

from fxprune import errors, verify
from fxprune._util import Report
from fxprune.api import compile
from fxprune.compile_backend import backend
from fxprune.estimator import estimate
from fxprune.heal import HealReport, heal
from fxprune.iterative import iterative_prune
from fxprune.plan import CompileResult, Plan
from fxprune.recipe import Recipe
from fxprune.replay import apply_plan, load
from fxprune.sensitivity import sensitivity
from fxprune.streaming import stream

__version__ = "0.1.0"

__all__ = [
    "CompileResult",
    "HealReport",
    "Plan",
    "Recipe",
    "Report",
    "apply_plan",
    "backend",
    "compile",
    "errors",
    "estimate",
    "heal",
    "iterative_prune",
    "load",
    "sensitivity",
    "stream",
    "verify",
]
