"""Studies that reproduce published length-extrapolation findings (`experiments.reproduce`).

A study (`Study`) trains its variants, evaluates them with the harness, summarises the results
and checks each of the paper's claims as a numeric criterion (`Criterion`), printing PASS or
FAIL. The studies themselves are defined in `configs/studies/*.py`; this package holds the
machinery: `study` (the types and the criterion helpers), `runner` (train, evaluate, resume,
results.json) and `report` (report.md and the terminal summary).
"""

from longjax.studies.study import Criterion, SIZES, Study, check_criteria

__all__ = ["Criterion", "SIZES", "Study", "check_criteria"]
