"""Federated algorithms: client update and server strategies. No Ray here."""
