"""The learning core both nodes use: the compressed-model format, LoRA, forward passes, local training,
DP-SGD, seeds and the secure-aggregation update vector. Neither node's networking lives here."""
