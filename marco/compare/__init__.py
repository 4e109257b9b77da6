"""``marco compare``: every strategy at every budget over the same problems, in one stored batch.

:mod:`~marco.compare.spec` turns ``--strategies/--budgets/--seeds`` into search configs,
:mod:`~marco.compare.stats` holds the interval and the paired test, :mod:`~marco.compare.table` reads a
stored batch back into the comparison, :mod:`~marco.compare.render` prints it and
:mod:`~marco.compare.plot` draws accuracy against spent tokens.
"""
