"""Inference backends behind one protocol (see :mod:`marco.llm.base`)."""
