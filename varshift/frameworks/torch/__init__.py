"""PyTorch models with data: the path feeding each BatchNorm, diagnosis and recalibration.

Nothing here is imported by ``import varshift``; these modules import torch. Start with
:func:`varshift.frameworks.torch.passes.diagnose` and
:func:`varshift.frameworks.torch.passes.recalibrate`.
"""
