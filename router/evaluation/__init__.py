"""evaluation: resource benchmarks against full-model baselines"""
