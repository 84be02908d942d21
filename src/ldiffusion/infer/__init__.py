"""Inference: sliding-window prediction of images, folders and slides."""
