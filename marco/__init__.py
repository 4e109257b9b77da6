"""Marco: Marco-o1 style reasoning search (MCTS over LLM generations, scored by token confidence)."""

__version__ = "0.1.0"
