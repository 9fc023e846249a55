"""Ensemble Explorer core: datasets, models, embeddings, exact retrieval metrics, sweeps, fusion, runs."""
