"""Test support shared by every test folder (and the benchmarks).

Importable as ``cagtest`` because pytest's ``pythonpath`` option (pyproject) puts ``tests/`` on
``sys.path``; the root conftest loads :mod:`cagtest.fixtures` as a plugin.

- :mod:`cagtest.bundle` — the quick model bundle, cached under a hash of the sources that build it.
"""
