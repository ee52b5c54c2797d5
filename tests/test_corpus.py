"""The default model's corpus: reStructuredText stripped to prose, documents split stably."""

from maria_onnx.tools.corpus import rst_to_prose, split_of

SOURCE = """\
.. _bltin-exceptions:

Built-in Exceptions
===================

.. index::
   statement: try

In a :keyword:`try` statement with an :keyword:`except`
clause, the :exc:`~builtins.KeyError` handler runs; see :ref:`the tutorial <tut-errors>`.

Use it like this::

   raise KeyError("x")

>>> 1 + 1
2

.. function:: abs(x)

   Return the ``absolute`` value of a **number**, as `Python <https://python.org>`_ does.

+------+------+
| a    | b    |
+------+------+
"""


def test_rst_becomes_prose():
    assert rst_to_prose(SOURCE).splitlines() == [
        "In a try statement with an except clause, the KeyError handler runs; see the tutorial.",
        "Use it like this:",
        "Return the absolute value of a number, as Python does.",
    ]


def test_split_is_stable_and_mostly_train():
    names = [f"library/module{i}.rst.txt" for i in range(400)]
    splits = [split_of(name) for name in names]
    assert splits == [split_of(name) for name in names]
    assert 0.8 < splits.count("train") / len(names) < 0.97 and splits.count("test") > 5
