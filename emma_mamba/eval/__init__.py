"""Evaluation: scorers for POPE, VQAv2, GQA, TextVQA, VizWiz and MME that read each benchmark's standard files.

``emma_mamba.eval.scorers.score(task, answers, annotations)`` is the single entry point; the per-benchmark
modules (``pope``, ``vqa``, ``gqa``, ``mme``) hold the metric definitions and answer normalisation.
"""
