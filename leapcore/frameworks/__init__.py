"""Adapters for frameworks other than PyTorch, imported only when used."""
