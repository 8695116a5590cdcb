"""Evaluation: exact image-text retrieval metrics (Recall@K, median rank)."""
