"""Supervised fine-tuning on CoT chats with TRL (full or LoRA), loss on assistant tokens only.

``run_sft(SFTConfig(...))`` trains in-process or, with ``nproc > 1``, under ``torchrun`` (data sharded
across ranks, gloo on CPU, NCCL on GPUs) and returns an :class:`SFTResult`. ``run_dpo(DPOConfig(...))`` is the
optional DPO stage on synthesised preference pairs (whole paths and sibling steps).
"""

from marco.sft.config import SFTConfig, SFTResult
from marco.sft.dpo import DPOConfig, DPOResult, run_dpo
from marco.sft.runner import run_sft

__all__ = ["DPOConfig", "DPOResult", "SFTConfig", "SFTResult", "run_dpo", "run_sft"]
