"""Batch generation from a prompt file on several workers (torchrun or Ray), deterministic and resumable.

See `rapiddiff.batch.run` for the file layout and the rules that make images independent of the worker count.
"""
