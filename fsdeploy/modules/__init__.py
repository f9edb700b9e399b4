"""Torch adaptation blocks (CaSE, TSA adapters, TOAST top-down attention) and where they go in each family."""
