"""The student structures, one file each; importing this package registers them in ``STRUCTURES``.

Each file holds the structure's frozen ``Params`` (the candidate's ``structure.*`` keys, the
papers' defaults), its ``Student`` subclass (what is built, what runs, and the plumbing the
Distiller and the search ask for) and, where it has one, its own loss part, which reads the same
``Params``. Adding a structure is one file here plus its line below.

- ``single``: the base alone.
- ``assistant``: RKD (Gao et al., "Residual Knowledge Distillation", arXiv 2002.09168, 2020).
- ``res_chain``: ResKD (Li et al., "ResKD: Residual-Guided Knowledge Distillation", IEEE TIP 2021).
- ``branches``: ERA (Yan et al., "Expandable Residual Approximation", arXiv 2508.16050, 2025).
"""

from autosplit.distill.structures import assistant, branches, res_chain, single

__all__ = ["assistant", "branches", "res_chain", "single"]
