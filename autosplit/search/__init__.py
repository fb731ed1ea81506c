"""The search: spaces, budgets, the Optuna driver, early stopping, fronts.

Import the submodules you need (``autosplit.search.space``, ``.driver``, ``.front``); this
package imports nothing itself, so ``import autosplit.tracking`` stays light.
"""
