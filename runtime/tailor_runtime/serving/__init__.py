"""Clients of the inference servers Tailor's exports are deployed to (imported only by what uses them)."""
