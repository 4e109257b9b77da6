"""Search strategies over LLM generations and the lockstep driver that batches them."""
