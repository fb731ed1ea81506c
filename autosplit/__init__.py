"""autosplit: search how to distil a teacher into the most accurate network under a FLOPs budget.

Importing this package does no work: it touches no GPU, imports no MLflow, Optuna or fvcore.
"""

__version__ = "0.1.0"
