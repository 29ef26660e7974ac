"""Executor: Plan + nn.Module -> DeviceMesh, pipeline stages and schedule, TP/SP, recompute, DP/ZeRO;
the training loop of `autoplan run`."""

from autoplan.executor.train import Parallelized, apply, init_distributed, train

__all__ = ["Parallelized", "apply", "init_distributed", "train"]
