"""Inference on new videos with a trained model: the self-contained model directory and `predict`."""
