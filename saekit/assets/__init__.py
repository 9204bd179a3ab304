"""Data shipped with saekit: the bundled corpus and the bundled demo language model.

Everything here is package data so that examples and tests run offline, without the HF Hub.
"""
