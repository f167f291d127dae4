"""Accuracy checks of FASTKV on a real pretrained model (CPU, offline)."""
